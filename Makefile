# Two commands do all the set-up on a fresh machine (Python 3.11+):
#   make demo   - a local swarm trains the debug model on the embedded corpus (about 2 minutes)
#   make test   - the whole test suite (real peers as real processes on 127.0.0.1): what CI runs
#   make test-fast - the fast lane: every test not marked `swarm` (no peer processes), under 2 minutes
#   make bench  - every benchmark, tables in benchmarks/results/report.md (root for the network ones;
#                 13-17 minutes on 2 shared cores, BENCH_ARGS=--quick about 7)
# and one joins a real swarm: make join PEERS=/ip4/.../tcp/31337/p2p/... [ARGS="--data ... --name ..."]
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install join bench
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

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not swarm"

# Same peer id on every run (the key file) and resume from the last checkpoint if there is one.
join: $(STAMP)
	$(if $(PEERS),,$(error set PEERS to the address of a peer of the swarm, e.g. make join PEERS=/ip4/.../p2p/...))
	$(VENV)/bin/swarm join --config configs/default.yaml --initial-peers $(PEERS) \
		--identity $(HOME)/.swarm/peer.key --set checkpoint.resume=auto $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks.run_all $(BENCH_ARGS)
