PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEFAULT_EXTRAS := cpu,cluster,dev,onnx
# paddlepaddle-gpu 3.x is not on PyPI: Paddle's own index (CUDA 12.6 wheels; cu118, cu129 also exist)
PADDLE_GPU_INDEX ?= https://www.paddlepaddle.org.cn/packages/stable/cu126/
comma := ,

# The stamp holds the extras of the last setup (a stamp from before it did counts as the default).
# EXTRAS given (make setup EXTRAS=gpu,cluster,dev,onnx) installs those; left out, every target keeps
# what is installed, so `make test` on a GPU setup does not switch back to the CPU build.
# onnx (export.py format=onnx: paddle2onnx, onnxruntime) joined the default later: a setup stamped
# before it adds it with `make setup EXTRAS=cpu,cluster,dev,onnx` (its tests are skipped until then).
INSTALLED_EXTRAS := $(if $(wildcard $(STAMP)),$(or $(strip $(shell cat $(STAMP))),$(DEFAULT_EXTRAS)))
EXTRAS ?= $(or $(INSTALLED_EXTRAS),$(DEFAULT_EXTRAS))
EXTRA_LIST := $(subst $(comma), ,$(EXTRAS))
WANTS_GPU := $(filter gpu,$(EXTRA_LIST))
WANTS_CPU := $(filter cpu,$(EXTRA_LIST))
# The two Paddle builds install the same `paddle` package: remove the other one first.
OTHER_PADDLE := $(if $(WANTS_GPU),paddlepaddle,$(if $(WANTS_CPU),paddlepaddle-gpu))

.PHONY: setup test test-fast test-gpu check-gpu demo locality-dynamics bench clean FORCE

# Idempotent: re-installs only when pyproject.toml changed or EXTRAS differs from the last setup.
setup: $(STAMP)
ifneq ($(strip $(EXTRAS)),$(INSTALLED_EXTRAS))
$(STAMP): FORCE
endif
$(STAMP): pyproject.toml
	$(if $(and $(WANTS_GPU),$(WANTS_CPU)),$(error EXTRAS=$(EXTRAS) names both cpu and gpu: choose one))
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(OTHER_PADDLE),if $(BIN)/python -m pip show -q $(OTHER_PADDLE) >/dev/null 2>&1; then \
	  $(BIN)/python -m pip uninstall -y -q $(OTHER_PADDLE); fi)
	$(BIN)/python -m pip install -q $(if $(WANTS_GPU),--extra-index-url $(PADDLE_GPU_INDEX)) -e ".[$(EXTRAS)]"
	echo '$(strip $(EXTRAS))' > $@

FORCE:

# The import contracts first (pyproject.toml's [tool.importlinter]), then the whole suite; the 15
# slowest tests are listed at the end (CI runs this target).
test: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The GPU tests (tests marked gpu; skipped, with the reason, where Paddle sees no GPU).
test-gpu: setup
	$(BIN)/python -m pytest -q -rs -m gpu

# A new GPU machine, in one command: first each GPU, its compute capability, the NVIDIA driver and
# Paddle's CUDA (or why no GPU is visible), then the GPU tests, then a short benchmark (convit_tiny
# 224/16, fp16, eager; results in outputs/bench/gpu_check.csv).
check-gpu: setup
	$(BIN)/python -m convitlab.ops.gpu_check
	$(BIN)/python -m pytest -q -rs -m gpu
	$(BIN)/python src/bench.py --models convit_tiny --resolutions 224/16 --batch-sizes 64 --variants ours local0 \
	  --amp fp16 --repeats 10 --output outputs/bench/gpu_check.csv

demo: setup
	$(BIN)/python src/train.py -m experiment=demo
	$(BIN)/python src/compare.py outputs/demo

locality-dynamics: setup
	$(BIN)/python src/train.py -m experiment=locality_dynamics
	$(BIN)/python src/compare.py outputs/locality_dynamics

bench: setup
	$(BIN)/python src/bench.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
