# Two commands do all the set-up on a fresh machine (make, Python 3.11+ with venv; docs/install.md):
#   make demo   - a local swarm trains the debug model on the embedded corpus (about 2 minutes)
#   make test   - the whole test suite (real peers as real processes on 127.0.0.1): what CI runs
#   make test-fast - the fast lane: every test not marked `swarm` (no peer processes), under 2 minutes
#   make bench  - every benchmark, tables in benchmarks/results/report.md (root for the network ones;
#                 13-17 minutes on 2 shared cores, BENCH_ARGS=--quick about 7)
# and one joins a real swarm: make join PEERS=/ip4/.../tcp/31337/p2p/... [TORCH=cuda] [ARGS="--data ... --name ..."]
#
# What gets installed: every target first makes the virtual environment .venv (`make install` alone
# does only that), with
#   1. torch at the version pinned in constraints.txt, in the build TORCH names, from PyTorch's own
#      wheel index (https://download.pytorch.org/whl/<build>, an extra index beside PyPI for torch's
#      own dependencies):
#        TORCH=cpu (the default, also what CI uses)   no CUDA libraries, about 0.2 GB download
#        TORCH=cuda                                    the CUDA 13.0 build (= cu130; NVIDIA driver >= 580)
#        TORCH=cu126 | cu129 | cu130 | cu132           that CUDA build (cu126 for drivers older than 580)
#      e.g. `make join PEERS=... TORCH=cuda`; the CUDA builds bring their CUDA libraries (about 3 GB).
#      TORCH_INDEX_URL=<url> takes a mirror of that index instead (empty: only PyPI and PIP_FIND_LINKS).
#      A wheel of that exact build in pip's local wheel folder (PIP_FIND_LINKS) is used without any index.
#   2. swarm in editable mode with its dependencies (hivemind, bitsandbytes, pydantic, ...), the `test`
#      extra (pytest, pytest-timeout, websockets) and the `export` extra (transformers, safetensors),
#      every one under the pins of constraints.txt.
# The stamp file names the build, so changing TORCH reinstalls torch (in the same .venv) at the next target.
PYTHON ?= python3
VENV := .venv
TORCH ?= cpu
TORCH_BUILDS := cpu cu126 cu129 cu130 cu132
# `cuda` is the CUDA build PyPI's own torch uses for this release
TORCH_BUILD := $(if $(filter cuda,$(TORCH)),cu130,$(TORCH))
$(if $(filter $(TORCH_BUILD),$(TORCH_BUILDS)),,$(error TORCH=$(TORCH) is not a PyTorch build; choose one of: cpu cuda $(filter-out cpu,$(TORCH_BUILDS))))
TORCH_VERSION := $(shell sed -n 's/^torch==\([0-9.]*\).*/\1/p' constraints.txt)
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/$(TORCH_BUILD)
STAMP := $(VENV)/.installed-torch-$(TORCH_BUILD)

.PHONY: demo test test-fast install join bench docs
BENCH_ARGS ?=

install: $(STAMP)

# torch first, by its exact build (2.13.0+cpu): pip would keep an installed torch of another build,
# since the constraint torch==2.13.0 admits every one of them. A wheel of that exact build in a local
# folder (PIP_FIND_LINKS) is taken as it is, without asking any index (whose retries, where it cannot be
# reached, cost minutes); otherwise PyTorch's index. torch's own dependencies come with swarm's.
$(STAMP): pyproject.toml constraints.txt
	rm -f $(VENV)/.installed $(VENV)/.installed-torch-*
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --no-index --no-deps 'torch==$(TORCH_VERSION)+$(TORCH_BUILD)' 2>/dev/null \
		|| $(VENV)/bin/pip install --quiet -c constraints.txt \
			$(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL)) 'torch==$(TORCH_VERSION)+$(TORCH_BUILD)'
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

# docs/configuration.md is rendered from the config schema (tests/test_config_reference.py checks it)
docs: $(STAMP)
	$(VENV)/bin/python -c "from swarm.config.reference import render; print(render(), end='')" > docs/configuration.md
