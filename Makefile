# The two commands: `make demo` (the main job on an embedded default) and `make test`.
# Both create .venv on first use; a second run reuses it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and explicitly: 2.13.0 is a CPU build on this machine's disk. On a
# machine that already has the torch it wants in $(VENV), nothing is reinstalled; to keep a
# CUDA build, create the venv with it (or `make TORCH_SPEC='torch>=2.9'`).
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= build/demo

.PHONY: setup test test-slow demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(VENV)/bin/dbrx-aot random-checkpoint $(DEMO_DIR)/checkpoint --preset tiny --seed 0 --shards 2 --force
	$(VENV)/bin/dbrx-aot generate $(DEMO_DIR)/checkpoint --runtime eager --chat \
		--prompt "What is a mixture of experts?" --max-new-tokens 24

clean:
	rm -rf build
