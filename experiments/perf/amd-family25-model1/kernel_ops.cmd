# AMD EPYC, family 25 model 1 (Zen 3: AVX2, no AVX-512; 2 cores, KVM; GCC 12, -march=native = znver3).
# convitlab's compiled kernels against the Paddle ops they replace, one thread and both cores, from the
# repository root; the timings of the two alternate (kernel_ops.py), since other jobs shared the machine.
grep -m2 -E "cpu family|^model\s" /proc/cpuinfo   # cpu family : 25, model : 1
D=experiments/perf/amd-family25-model1
PY=/work/main/.venv/bin/python
OMP_NUM_THREADS=1 $PY experiments/perf/kernel_ops.py > $D/kernel_ops_1thread.txt
$PY experiments/perf/kernel_ops.py > $D/kernel_ops.txt
