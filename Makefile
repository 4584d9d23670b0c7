# megaclass: `make test` and `make demo` set everything up in .venv on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megaclass-installed
WORDNET := /usr/share/wordnet/data.noun
DATA_ROOT ?=
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=
# DeepSpeed's JIT-compiled ops (shared-memory collectives on CPU) are cached per .venv, not in the
# shared ~/.cache: two checkouts on one machine would otherwise rebuild them in turn.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup build test demo bench gpu-check gpu-rehearsal gpu-wheels clean

setup: $(STAMP) $(WORDNET) build

# The tested versions are pinned in constraints.txt (pyproject.toml has lower bounds only). The package is
# installed without build isolation, so that the extension is built against this torch, not a fetched one.
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
$(STAMP): setup.py pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) setuptools wheel ninja
	$(PIP) torch torchvision
	MEGACLASS_NO_EXTENSION=1 $(PIP) --no-build-isolation -e '.[test]'
	touch $@

# WordNet 3.0 from Debian (no download from NLTK's servers); skipped where apt is missing.
$(WORDNET):
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null; \
	else echo "note: apt-get unavailable; megaclass needs WordNet 3.0 (see docs/semantics.md: WordNet)"; fi

# Incremental (ninja) build of megaclass._C into the source tree. On a CPU-only machine DeepSpeed
# JIT-compiles its shared-memory collectives on first use: build them here, once, not inside a test.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace
	@$(PY) -c "from deepspeed.accelerator import get_accelerator as a; \
		b = a().create_op_builder('ShareMemCommBuilder') if a().device_name() == 'cpu' else None; \
		b is not None and b.load(verbose=False)" 2>&1 | grep -v "^\[" || true

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	@set -euo pipefail; data="$(DATA_ROOT)"; \
	if [ -z "$$data" ]; then data="$(RUN_DIR)/synthetic-data"; \
		if [ ! -f "$$data/info/synsets.txt" ]; then rm -rf "$$data"; $(VENV)/bin/megaclass synth --out "$$data"; fi; fi; \
	for mode in staged online; do \
		PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/deepspeed --num_gpus 2 launch/experiment.py \
			--config configs/demo.yaml --set data.root="$$data" --set run_dir="$(RUN_DIR)" \
			--set experiment.mode=$$mode; \
	done

bench: setup
	$(VENV)/bin/megaclass bench ce

# The GPU check (.ci/gpu-check, docs/cuda.md) with this checkout's .venv as the python3 on PATH; on the GPU
# machine's image run `.ci/gpu-check OUT_DIR` itself. gpu-rehearsal: the same steps on the CPU at tiny shapes.
GPU_CHECK_DIR ?= runs/gpu-check
gpu-check: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" .ci/gpu-check $(GPU_CHECK_DIR)

gpu-rehearsal: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" GPU_CHECK_REHEARSAL=1 .ci/gpu-check $(GPU_CHECK_DIR)-rehearsal

# Wheels of the GPU check's peers for the GPU image (Python 3.12, no package registry there), into the
# ignored .whl/. Their only requirements, torch and triton, are on the image (docs/cuda.md). webdataset (and its
# braceexpand; numpy and PyYAML are on the image) is for `megaclass bench input`'s tar shards.
GPU_WHEELS := cut-cross-entropy==25.1.1 liger-kernel==0.8.5 webdataset==1.0.2 braceexpand==0.1.7
gpu-wheels:
	rm -f .whl/cut_cross_entropy-*.whl .whl/liger_kernel-*.whl .whl/webdataset-*.whl .whl/braceexpand-*.whl  # one version of each: two stop the install there
	$(PYTHON) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	@ls .whl

clean:
	rm -rf build megaclass/_C*.so *.egg-info
