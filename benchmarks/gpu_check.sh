#!/usr/bin/env bash
# One pass of the GPU checks on a CUDA machine, under 8 minutes, installing nothing heavy:
#   1. the tests marked `gpu`, 2. the tests of the Triton ops (compiled, not interpreted),
#   3. the loss benchmark on the GPU (bf16, 8 pairs x 1024 tokens, H=4096, V=128256),
#   4. the end-to-end training benchmark against TRL and TRL+Liger (1.24B Llama config, bf16, long-prompt
#      profile, 12 steps, the first 2 untimed, gradient checkpointing on for all),
#   5. the longest pair each of them trains under a 24 GB cap (one pair per step; doubling, then bisecting
#      while the per-contender time budget lasts: the table says whether the bracket closed; without a
#      time limit, `bench_e2e.py --device cuda --search-only` searches 300 s per contender).
# The limits add up to 8 minutes (60 + 90 + 150 + 95 + 85 s); the end-to-end runs come last so a slow start
# cannot cost the rest. Both write their tables after every contender, so a run cut by its limit keeps rows.
# Results and logs go to benchmarks/results/ and, when $OUT is set, are copied into $OUT.
#
#   bash benchmarks/gpu_check.sh            # PY=python3 by default; .venv/bin/python when present
#
# On the lent device machine (its image lacks datasets, TRL and Liger-Kernel): first, here,
# `bash benchmarks/device_wheels.sh` fills .whl/; then run this script there carrying .whl.
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PY:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
LOG_DIR="benchmarks/results/gpu_check_logs"
mkdir -p "$LOG_DIR"
unset TRITON_INTERPRET  # the point is to run the compiled kernels

status=0
step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a time limit, logs it, records a failure
    local name="$1" limit="$2"
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    if [ "$rc" -ne 0 ]; then status=1; fi
}

"$PY" - <<'EOF' || { echo "CUDA is not available to $PY: this script is for a GPU machine"; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
EOF

# Wheels carried in .whl/ (benchmarks/device_wheels.sh: datasets, TRL, Liger-Kernel, which the device
# image lacks) go into a private site folder, dependencies not resolved: the image has the rest.
if compgen -G ".whl/*.whl" > /dev/null; then
    echo "=== installing the carried wheels: $(ls .whl | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dpo_fast_site \
        .whl/*.whl && export PYTHONPATH="/tmp/dpo_fast_site${PYTHONPATH:+:$PYTHONPATH}" || status=1
else
    echo "=== no .whl/ carried: test modules that import datasets/TRL are skipped, Liger is not benchmarked"
fi

# The package must import from this tree (dpo_fast.kernels lives in ./kernels): an editable install
# without dependencies takes seconds; skip it when the import already works.
if ! "$PY" -c "import dpo_fast, dpo_fast.kernels" 2>/dev/null; then
    echo "=== installing dpo_fast in editable mode (no dependencies)"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || status=1
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

# A test module importing a package the image lacks must not stop the others from running.
step pytest_gpu 60 "$PY" -m pytest -q -m gpu --continue-on-collection-errors tests
triton_tests=(tests/test_triton*.py)
if [ -e "${triton_tests[0]}" ]; then
    step pytest_triton 90 "$PY" -m pytest -q "${triton_tests[@]}"
else
    echo "=== no tests/test_triton*.py found"; status=1
fi
# The GPU contenders only (naive always runs): the torch-backend rows are the CPU path and would spend
# the step's time limit on 128k-vocabulary tiles.
step bench_loss 150 "$PY" benchmarks/bench_loss.py --device cuda --only triton --only liger --only trl
# Both runs train from the same initial weights, initialised once on the host and kept in /tmp.
E2E=("$PY" benchmarks/bench_e2e.py --device cuda --contenders "trl,trl+liger,dpo_fast" --weights-cache /tmp/dpo_fast-e2e-weights)
step bench_e2e 95 "${E2E[@]}" --profile long --steps 12
step length_search 85 "${E2E[@]}" --search-only --memory-cap-gb 24 --search-start 4096 --search-resolution 0.25 \
    --search-budget-s 20

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    # The device tool brings back at most 8 files: the three tables as they are, everything in one archive.
    cp benchmarks/results/loss-cuda.md benchmarks/results/e2e-long-cuda.md benchmarks/results/e2e-search-cuda.md \
        "$OUT"/ 2>/dev/null || true
    tar czf "$OUT/gpu_check.tgz" "$LOG_DIR" benchmarks/results/*cuda* 2>/dev/null || true
    echo "=== copied results into $OUT"
fi
exit $status
