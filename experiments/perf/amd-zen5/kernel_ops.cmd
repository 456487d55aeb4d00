# AMD EPYC, family 26 model 2 (Zen 5: AVX-512; 2 cores, KVM; -march=native). convitlab's compiled kernels
# against the Paddle ops they replace, one thread and both cores, from the repository root; the two are
# timed in alternation (kernel_ops.py). Source of MEASURED_SPEEDUP's "AMD family 26 (Zen 5)" row.
grep -m2 -E "cpu family|^model\s" /proc/cpuinfo   # cpu family : 26, model : 2
D=experiments/perf/amd-zen5
PY=.venv/bin/python
OMP_NUM_THREADS=1 $PY experiments/perf/kernel_ops.py > $D/kernel_ops_1thread.txt
$PY experiments/perf/kernel_ops.py > $D/kernel_ops.txt
