# Quick start: `make serve` (set up + serve the default model on 127.0.0.1:8000), `make test` (set up + run the tests).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup serve test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/jaxserve serve

# Three workers, a test file each at a time: XLA compiles on one core and servers wait on sockets, so
# on a 2-core machine three workers keep both cores busy (192% over a cold suite of 1,429 s; two
# left a quarter idle). PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 3

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=15 -n $(PYTEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(VENV)/bin/jaxserve bench generate

clean:
	rm -rf $(VENV) build *.egg-info
