# Two commands do everything on a fresh machine:
#   make demo   set up, then train linear vs mpi routers on the embedded corpus and compare (~5 min, 2 CPU cores)
#   make test   set up (with the torchtitan and megatron extras), then run the test suite
# Set-up: a virtualenv in .venv that can see a torch you already have; torch==2.13.0 is
# installed only when no torch is importable (an unpinned torch would pull a multi-GB CUDA build).
# The dev extra is installed at the exact versions of constraints-test.txt (.ci/pin-constraints makes it),
# so CI tests what was tested; pyproject.toml keeps the package's own ranges loose for users.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mpirouter-installed
TITAN_STAMP := $(VENV)/.mpirouter-titan-installed
# The torchtitan extra, pinned for the tests. torchtitan pins datasets<4.8 (dev has 5.x) and pulls wandb,
# torchdata/torch-checkpointing require torch: these go in --no-deps; importing torchtitan needs triton.
TITAN_NO_DEPS := torchtitan==0.3.0 triton==3.9.0 torchdata==0.11.0 torch-checkpointing==0.1.1 spmd-types==0.2.3
TITAN_DEPS := tyro==1.0.17 tensorboard==2.21.0 einops==0.8.2
MEGATRON_STAMP := $(VENV)/.mpirouter-megatron-installed
# The megatron extra, pinned for the tests: megatron-core 0.19.2 declares Python >= 3.12 but its megatron.core runs
# on 3.11 (docs/megatron.md); its own dependencies (torch, numpy, packaging) are already installed; importing it
# needs triton, as torchtitan does.
MEGATRON_NO_DEPS := megatron-core==0.19.2 triton==3.9.0
# glibc: keep big buffers mapped between steps (docs/performance.md); the CLI sets it itself too.
export GLIBC_TUNABLES ?= glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-test.txt
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints-test.txt -e ".[dev]"
	touch $@

$(TITAN_STAMP): $(STAMP) Makefile
	$(PY) -m pip install --quiet --no-deps $(TITAN_NO_DEPS)
	$(PY) -m pip install --quiet $(TITAN_DEPS)
	touch $@

$(MEGATRON_STAMP): $(STAMP) Makefile
	$(PY) -m pip install --quiet --no-deps --ignore-requires-python $(MEGATRON_NO_DEPS)
	touch $@

demo: setup
	$(VENV)/bin/mpirouter demo

# the suite runs one thread per process (tests/conftest.py), so one worker per core, a test file per worker
TEST_WORKERS ?= 2
test: setup $(TITAN_STAMP) $(MEGATRON_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

bench: setup
	$(VENV)/bin/mpirouter bench

clean:
	rm -rf $(VENV) runs build src/*.egg-info .pytest_cache
