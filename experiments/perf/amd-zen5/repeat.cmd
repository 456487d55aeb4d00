# A second run (03:25 UTC, 7 minutes after results.csv) to show how stable the numbers are:
/work/main/.venv/bin/python src/bench.py --models convit_tiny --resolutions 224/16 32/4 --batch-sizes 32 64 --variants ours local0 timm timm_local0 --torch-python /tmp/torchenv/bin/python --repeats 5 --warmup 2 --output /tmp/perfwork/repeat.csv
# then copied to experiments/perf/repeat.csv
