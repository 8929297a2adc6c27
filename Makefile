# make train | make test | make bench — each sets up .venv on first use.
# torch is installed first and pinned: an unpinned torch on a machine without a GPU pulls a
# multi-GB CUDA build.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup train test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

train: setup
	$(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The benchmark table (bench/results.md; with BENCH_ARGS="--only train", bench/results_train.md), or "--quick".
bench: setup
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf outputs multirun .cache .pytest_cache
