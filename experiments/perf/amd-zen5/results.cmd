# timm's environment, outside the repo (a CPU torch 2.13.0 wheel is on this machine's disk; pip takes it):
#   python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 timm
# measured 03:11-03:18 UTC on the 2-core AMD EPYC, nothing else running (load log: only this command):
/work/main/.venv/bin/python src/bench.py --models convit_tiny --resolutions 224/16 32/4 --batch-sizes 32 64 --variants ours local0 baseline seed seed_defaults timm timm_local0 --torch-python /tmp/torchenv/bin/python --repeats 5 --warmup 2 --output experiments/perf/results.csv
