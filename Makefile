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

.PHONY: setup build test demo bench gpu-check clean

setup: $(STAMP) $(WORDNET) build

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check setuptools wheel ninja
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	MEGACLASS_NO_EXTENSION=1 $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e '.[test]'
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
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/deepspeed --num_gpus 2 launch/experiment.py \
		--config configs/demo.yaml --set data.root="$$data" --set run_dir="$(RUN_DIR)"

bench: setup
	$(VENV)/bin/megaclass bench ce

gpu-check: setup
	bash .ci/gpu-check

clean:
	rm -rf build megaclass/_C*.so *.egg-info
