# AMD family 25 model 1 (the 2-core AMD EPYC of issue 23: Zen 3, AVX2 and FMA, no AVX-512; KVM; GCC 12,
# -march=native = znver3). From the repository root; every file lands beside this one. Other jobs shared
# the machine's two cores during the run (see README.md).
# timm's environment, outside the repo (the CPU torch 2.13.0 wheel is on disk; never plain `pip install torch`):
#   python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 timm
set -e
D=experiments/perf/amd-family25-model1
PY=/work/main/.venv/bin/python
grep -m2 -E "cpu family|^model\s" /proc/cpuinfo   # cpu family : 25, model : 1
# 0. the compiled kernels against the Paddle ops they replace (kernel_ops.cmd)
OMP_NUM_THREADS=1 $PY experiments/perf/kernel_ops.py > $D/kernel_ops_1thread.txt
$PY experiments/perf/kernel_ops.py > $D/kernel_ops.txt
# 1. convit_tiny as a user gets it against timm 1.0 on torch 2.13, 224/16 batch 32 and 32/4 batch 64,
#    every core, one process; then once more (the spread between runs), then ours with the kernels off (A/B)
$PY src/bench.py --models convit_tiny --resolutions 224/16 32/4 --batch-sizes 32 64 \
    --variants ours timm --torch-python /tmp/torchenv/bin/python --repeats 5 --warmup 2 --output $D/results.csv
$PY src/bench.py --models convit_tiny --resolutions 224/16 32/4 --batch-sizes 32 64 \
    --variants ours timm --torch-python /tmp/torchenv/bin/python --repeats 5 --warmup 2 --output $D/repeat.csv
CONVITLAB_CPU_KERNELS=0 $PY src/bench.py --models convit_tiny --resolutions 224/16 32/4 --batch-sizes 32 64 \
    --variants ours --repeats 5 --warmup 2 --output $D/kernels_off.csv
# 2. the demo's micro models as the demo runs them: 8x8 digits (1 channel), patch 2, 10 classes,
#    batch 32, one thread per job; timm's ConVit built at the same sizes
OMP_NUM_THREADS=1 $PY src/bench.py --models convit_micro deit_micro --resolutions 8/2 --batch-sizes 32 \
    --num-classes 10 --variants ours timm --torch-python /tmp/torchenv/bin/python \
    --repeats 50 --warmup 10 --output $D/micro.csv
# 3. the micro models once more, after kernel_fits' cheaper emptiness test (commit 67f20da)
OMP_NUM_THREADS=1 $PY src/bench.py --models convit_micro deit_micro --resolutions 8/2 --batch-sizes 32 \
    --num-classes 10 --variants ours timm --torch-python /tmp/torchenv/bin/python \
    --repeats 50 --warmup 10 --output $D/micro_repeat.csv
