# Two commands on a fresh machine with only Python: `make demo` and `make test`.
# Each creates its own virtual environment first.
#
# TORCH_SPEC pins the torch build: the default takes the CPU wheel this machine keeps on disk.
# On a GPU machine, override it, e.g. `make test TORCH_SPEC="torch==2.11.0"`.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
# On a machine without CUDA the Triton kernels run in Triton's interpreter.
HAS_CUDA   := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifneq ($(HAS_CUDA),1)
export TRITON_INTERPRET ?= 1
endif

PROFILE    ?= long
STEPS      ?= 12

.PHONY: env test lint demo bench bench-loss bench-pack bench-layouts bench-e2e gpu-check clean

env: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

demo: $(STAMP)
	$(VENV)/bin/dpo-fast demo

bench: bench-loss bench-pack bench-layouts bench-e2e

bench-loss: $(STAMP)
	$(PY) benchmarks/bench_loss.py

bench-pack: $(STAMP)
	$(PY) benchmarks/bench_packing.py

bench-layouts: $(STAMP)
	$(PY) benchmarks/bench_layouts.py

# End-to-end training throughput against TRL (gradient checkpointing on for every contender; pass
# E2E_ARGS=--no-gradient-checkpointing for the other table): `make bench-e2e PROFILE=short STEPS=12`.
bench-e2e: $(STAMP)
	$(PY) benchmarks/bench_e2e.py --profile $(PROFILE) --steps $(STEPS) $(E2E_ARGS)

# On a CUDA machine: GPU tests and the GPU benchmark tables, under 8 minutes (results also under $OUT).
gpu-check: $(STAMP)
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info dpo_fast/_packing_cpp*.so
