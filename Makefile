# tilefuse developer commands. Everything runs in .venv/ at the project root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tilefuse.demo demo --picture docs/demo-registration.png

test: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# The peers compared in the benchmarks live in their own venv, never in tilefuse's dependencies.
BENCH_VENV := benchmarks/.venv
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet -e . multiview-stitcher==0.1.62
	touch $@

REG_VENV := benchmarks/.venv-reg
$(REG_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(REG_VENV)
	$(REG_VENV)/bin/python -m pip install --quiet -e . ashlar==1.20.0 m2stitch==0.7.2
	touch $@

bench: $(TEST_STAMP) $(BENCH_VENV)/.installed $(REG_VENV)/.installed
	$(BIN)/python benchmarks/bench_fusion.py --repeats 5
	$(BIN)/python benchmarks/bench_fusion.py --repeats 5 --tile-compression zlib
	$(BIN)/python benchmarks/bench_3d.py
	$(BIN)/python benchmarks/bench_scale.py --mosaic 50000
	$(BIN)/python benchmarks/bench_registration.py
	$(BIN)/python benchmarks/bench_cycles.py
	$(BIN)/python benchmarks/bench_pairs.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(REG_VENV) demo build dist .pytest_cache
