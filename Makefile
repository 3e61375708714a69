# Quick start: `make demo` (the main job) and `make test` (the test suite). Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-smollm2 test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	touch $@

demo: setup
	$(PY) examples/synthetic_fit.py

demo-smollm2: setup
	$(VENV)/bin/softmix demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check torch_softmix tests examples benchmarks

bench: setup
	$(PY) benchmarks/bench_em.py

clean:
	rm -rf $(VENV) .pytest_cache
