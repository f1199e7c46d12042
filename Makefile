# Two commands do all the set-up on a fresh machine (Python 3.11+):
#   make demo   - a local swarm trains the debug model on the embedded corpus (about 2.5 minutes)
#   make test   - the test suite (real peers as real processes on 127.0.0.1)
#   make bench  - every benchmark, tables in benchmarks/results/report.md (root for the network ones;
#                 about 25 minutes, BENCH_ARGS=--quick about 10)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install bench
BENCH_ARGS ?=

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/swarm demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/run_all.py $(BENCH_ARGS)
