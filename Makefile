PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,cluster,dev

.PHONY: setup test test-fast demo bench clean

# Idempotent: re-installs only when pyproject.toml changed since the last setup.
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	$(BIN)/python src/train.py -m experiment=demo
	$(BIN)/python src/compare.py outputs/demo

bench: setup
	$(BIN)/python src/bench.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
