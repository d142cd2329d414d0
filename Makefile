# Quick start: `make serve` (set up + serve the default model on 127.0.0.1:8000), `make test` (set up + run the tests).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# pytest-xdist workers for `make test`: the suite mostly compiles, one program per core at a time.
TEST_WORKERS ?= 2

.PHONY: setup serve test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/jaxserve serve

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

bench: $(STAMP)
	$(VENV)/bin/python scripts/bench_generate.py

clean:
	rm -rf $(VENV) build *.egg-info
