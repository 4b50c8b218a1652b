#!/usr/bin/env bash
# The one prepared script for a GPU machine (Python 3.12, torch 2.11, triton 3.6, no internet).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh      (OUT defaults to benchmarks/results/latest)
#
# Steps (each runs even if an earlier one failed; the exit status is non-zero if any failed):
#   1. pip install --no-deps --no-build-isolation -e .   (quiet)
#   2. nvidia-smi summary, versions
#   3. python benchmarks/bench_attention.py              -> $OUT/bench_attention.json
#   4. every GPU test (pytest -m gpu)
#   5. python benchmarks/bench_kernels.py                -> $OUT/bench_kernels.json
#   6. python benchmarks/bench_decode.py (a cache step)  -> $OUT/bench_decode.json
#   7. bench_decode.py --queries 512 (a chunked prefill)  -> $OUT/bench_decode_chunk.json
# The attention measurements come first (they decide the attention lowering), then the tests, the
# linear kernels and the decoding steps, each with the time left. pytest prints its slowest tests
# (--durations) so that the next run can be sized, and runs on 8 workers where pytest-xdist is
# installed (a 15-minute lease, machine start included: on an H200 the tests took 120 s; with the
# tests first on 4 workers, the whole script 450 s).
# The benchmarks rewrite their JSON after every measured row, so a step stopped at its limit still
# leaves what it measured. Every step's log, the JSON and the versions are also bundled, after each
# step, into $OUT/gpu_check_logs.tgz (a lent machine returns few files).
# Budget: GPU_CHECK_BUDGET_S (default 400 s) in all; each step also has its own limit, cut to what is left.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/latest}"
mkdir -p "$OUT"
LOGS="$(mktemp -d)"  # every log and JSON; bundled into $OUT after each step
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
failed=()
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-400}))  # whole script, seconds

step() {  # step NAME TIMEOUT_S COMMAND... ; logs to $OUT/NAME.log
    local name="$1" limit="$2"
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: skipped, the script's time budget is spent"; failed+=("$name(skipped)"); return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "=== $name: $* (limit ${limit}s)"
    local t0=$SECONDS
    set -o pipefail
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=$?
    set +o pipefail
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed+=("$name(rc=$rc)")
    bundle
}

bundle() {  # the benchmarks' JSON straight into $OUT, everything into one archive beside it
    for f in "$LOGS"/*.json; do [ -e "$f" ] && cp "$f" "$OUT/"; done
    tar -C "$LOGS" -czf "$OUT/gpu_check_logs.tgz.part" . && mv "$OUT/gpu_check_logs.tgz.part" "$OUT/gpu_check_logs.tgz"
}

step pip_install 120 "$PY" -m pip install --no-deps --no-build-isolation -e .

echo "=== nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
        --format=csv 2>&1 | tee "$LOGS/nvidia_smi.csv"
else
    echo "nvidia-smi not found"; failed+=("nvidia-smi")
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1 | tee "$LOGS/versions.txt"

bundle

PYTEST=("$PY" -m pytest -q -m gpu --durations=15)
if "$PY" -c "import xdist" >/dev/null 2>&1; then PYTEST+=(-n 8); fi  # compilation dominates: 8 processes
step bench_attention 180 "$PY" benchmarks/bench_attention.py --budget-s 150 --out "$LOGS/bench_attention.json"
step pytest_gpu 150 "${PYTEST[@]}" tests
step bench_kernels 110 "$PY" benchmarks/bench_kernels.py --budget-s 80 --out "$LOGS/bench_kernels.json"
step bench_decode 45 "$PY" benchmarks/bench_decode.py --device cuda --contexts 8192 32768 131072 \
    --out "$LOGS/bench_decode.json"
step bench_decode_chunk 30 "$PY" benchmarks/bench_decode.py --device cuda --contexts 32768 --queries 512 \
    --out "$LOGS/bench_decode_chunk.json"

if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED steps: ${failed[*]}"
    exit 1
fi
echo "all steps passed; results in $OUT"
