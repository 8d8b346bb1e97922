# `make test` and `make demo` work from a fresh clone: they create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench bench-gpu bench-memory clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision come from local disk on the build machines (capped at 2.14.1 / 0.29.1).
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/python -m pip install -q "torch<=2.14.1" "torchvision<=0.29.1"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/causalign demo --out demo_out

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_erm.py --out benchmarks/results/erm.json

bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_gpu.py --out benchmarks/results/gpu.json

bench-memory: $(STAMP)
	$(BIN)/python benchmarks/bench_memory.py --out benchmarks/results/memory.json

clean:
	rm -rf demo_out .pytest_cache
