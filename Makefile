# pplx: the two commands of the README (`make demo`, `make test`) install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo demo-fabric test test-gpu bench figures lint build clean

setup:
	VENV=$(VENV) bash scripts/bootstrap.sh

# Rebuild the C extension in place after editing native/ (setup does it too).
build:
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

demo: setup
	$(PY) -m pplx.moe.demo $(DEMO_ARGS)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

test-gpu: setup
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

demo-fabric: setup
	$(PY) -m pplx.fabric.demo

bench: setup
	$(PY) -m pplx.bench fabric --provider shm

figures: setup
	$(PY) -m experiments.run_all

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf build *.egg-info pplx/_native*.so pplx/_native.c
