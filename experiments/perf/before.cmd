/work/main/.venv/bin/python src/bench.py --variants ours local0 baseline seed --repeats 3 --warmup 1 --output experiments/perf/before.csv --no-peak
