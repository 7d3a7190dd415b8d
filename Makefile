# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   install, then build the embedded tiny-xl-shapes model's INT8 benchmark (the main job)
#   make test   install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch; on a CUDA machine use e.g. `make demo TORCH=torch==2.11.0`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

demo: install
	$(BIN)/snakemake --cores 1 results/tiny-xl-shapes/int8/bench.json

# System packages for the real-cluster and browser tests (only as root with apt; else they skip).
test: install
	bash .ci/slurm-deps
	bash .ci/chromium-deps
	$(BIN)/pytest -q

lint: install
	$(BIN)/snakemake --lint
