# "Before": the tree as it was before this speed work (commit dbea1cb: MKL_DEBUG_CPU_TYPE=5,
# glibc's malloc defaults, stock-broadcast bias adds and LayerNorm backward, split q/k/v), measured
# on the same machine at 03:20 UTC, right after results.csv, the machine otherwise quiet:
git -C /work/main archive dbea1cb src experiments/perf | tar -x -C /tmp/before
cd /tmp/before && PYTHONPATH=/tmp/before/src /work/main/.venv/bin/python src/bench.py --variants ours local0 baseline seed --repeats 5 --warmup 2 --no-peak --output /tmp/perfwork/before.csv
# then copied to experiments/perf/before.csv
