#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels that the lent GPU machine's image lacks for
# `benchmarks/gpu_check.sh`: datasets (with dill and multiprocess), which dpo_fast's data modules and
# tests import, and the peers of the loss benchmark, TRL and Liger-Kernel. That image has Python 3.12
# (torch 2.11, triton 3.6, transformers, accelerate, pyarrow, pandas, xxhash: see the device notes).
# Run it here, where PyPI is reachable; the device run then carries .whl and gpu_check.sh installs it.
#
#   bash benchmarks/device_wheels.sh            # PY=python3 by default
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PY:-python3}"
SPECS=("datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" "trl==1.16.0" "liger-kernel==0.8.5")
mkdir -p .whl
for spec in "${SPECS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$spec"
done
ls -l .whl
