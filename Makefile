# Quick start: `make demo` (the main job) and `make test` (the test suite). Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-synthetic test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	touch $@

demo: setup
	$(VENV)/bin/softmix demo

demo-synthetic: setup
	$(PY) examples/synthetic_fit.py

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check torch_softmix tests examples benchmarks scripts notebooks

bench: setup
	$(PY) benchmarks/bench_em.py

clean:
	rm -rf $(VENV) .pytest_cache
