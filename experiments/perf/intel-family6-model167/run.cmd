# Intel family 6 model 167 (the 2-core Intel Xeon of this project's machine: AVX-512 F/CD/BW/DQ/VL,
# VNNI, BF16, FP16, AMX; KVM, so the model number is what the hypervisor reports): the quiet-machine run
# of issue 15. From the repository root, with nothing else running; every file lands beside this one.
# timm's environment, outside the repo (the CPU torch 2.13.0 wheel is on disk; never plain `pip install torch`):
#   python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 timm
set -e
D=experiments/perf/intel-family6-model167
PY=/work/main/.venv/bin/python
# 1. convit_tiny as a user gets it (src/bench.py calls runtime.setup(), nothing set by hand) against timm 1.0 on torch 2.13,
#    and both at the same size without GPSA, 224/16 batch 32 and 32/4 batch 64, every core, one process;
#    then ours and timm once more (the spread between runs), ours with the compiled kernels off (A/B), and
#    ours as it was before this session's kernels (commit 309a277, from a worktree made first with
#    `git worktree add /work/wt/before 309a277`):
$PY src/bench.py --models convit_tiny --resolutions 224/16 32/4 --batch-sizes 32 64 \
    --variants ours local0 timm timm_local0 --torch-python /tmp/torchenv/bin/python \
    --repeats 5 --warmup 2 --output $D/results.csv
$PY src/bench.py --models convit_tiny --resolutions 224/16 32/4 --batch-sizes 32 64 \
    --variants ours timm --torch-python /tmp/torchenv/bin/python --repeats 5 --warmup 2 --output $D/repeat.csv
CONVITLAB_CPU_KERNELS=0 $PY src/bench.py --models convit_tiny --resolutions 224/16 32/4 --batch-sizes 32 64 \
    --variants ours --repeats 5 --warmup 2 --output $D/kernels_off.csv
(cd /work/wt/before && $PY src/bench.py --models convit_tiny --resolutions 224/16 32/4 --batch-sizes 32 64 \
    --variants ours --repeats 5 --warmup 2 --output /work/main/$D/before_309a277.csv)
# 2. the demo's micro models as the demo runs them: 8x8 digits (1 channel), patch 2, 10 classes,
#    batch 32, one thread per job (two jobs share the two cores); timm's ConVit built at the same sizes:
OMP_NUM_THREADS=1 $PY src/bench.py --models convit_micro deit_micro --resolutions 8/2 --batch-sizes 32 \
    --num-classes 10 --variants ours timm --torch-python /tmp/torchenv/bin/python \
    --repeats 50 --warmup 10 --output $D/micro.csv
# 3. the demo's wall time (make setup first, outside the clock: it reinstalls when pyproject.toml changed)
make setup
rm -rf outputs/demo
/usr/bin/time -f "make demo: %e s wall" -o $D/demo_time.txt make demo
# 4. where the time goes, one training step each (the profiler adds ~10%)
for cfg in "224 16 32" "32 4 64"; do set -- $cfg
  $PY experiments/perf/profile_ops.py --variant ours --img $1 --patch $2 --batch $3 --mode train \
      > $D/profile_ours_train_$1.txt
  (cd experiments/perf && /tmp/torchenv/bin/python profile_timm_ops.py --img $1 --patch $2 --batch $3 --rows 40) \
      > $D/profile_timm_train_$1.txt
done
OMP_NUM_THREADS=1 $PY experiments/perf/profile_ops.py --model convit_micro --img 8 --patch 2 --batch 32 \
    --num-classes 10 --mode train > $D/profile_ours_train_micro.txt
# 5. single ops with the compiled kernels against the Paddle ops they replace (switched at run time)
$PY experiments/perf/kernel_ops.py > $D/kernel_ops.txt
