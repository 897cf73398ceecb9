#!/usr/bin/env bash
# The prepared GPU benchmark run for a lent H100/H200: ~8 minutes, all of tools/bench_gpu.py.
#
#   PYTHONPATH=. bash tools/run_gpu_benchmarks.sh              # results under $OUT (or runs/gpu_bench)
#   BENCH_BUDGET_S=300 PYTHONPATH=. bash tools/run_gpu_benchmarks.sh --sections sync head train
#
# Needs only torch, torchvision, timm, numpy, accelerate (no webdataset, no wandb, no network).
# Writes gpu_bench.jsonl (one JSON line per measurement, appended as they finish),
# gpu_bench.md (summary, rewritten after every job, so a killed run still leaves one),
# gpu_bench.log (stdout+stderr) and nvidia-smi.txt. Jobs that would overrun BENCH_BUDGET_S
# are skipped with a JSON line saying so; BENCH_TIMEOUT_S is the hard limit (SIGTERM, then
# SIGKILL 20 s later). Exit status: bench_gpu's (0 all fine, 1 some measurement failed or a
# host sync was found, 2 no CUDA device), 124/137 when the hard limit hit.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-runs/gpu_bench}"
BUDGET_S="${BENCH_BUDGET_S:-400}"
TIMEOUT_S="${BENCH_TIMEOUT_S:-480}"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi

export PYTHONPATH="${PYTHONPATH:-.}" HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/cssr_inductor_cache}"
mkdir -p "$OUT_DIR"

{ command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi; } > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
echo "run_gpu_benchmarks: budget ${BUDGET_S} s, hard limit ${TIMEOUT_S} s, results in $OUT_DIR" >&2

timeout -k 20 "$TIMEOUT_S" "$PY" tools/bench_gpu.py --budget-s "$BUDGET_S" --out "$OUT_DIR" "$@" \
    2>&1 | tee "$OUT_DIR/gpu_bench.log"
rc=${PIPESTATUS[0]}
if [ -f "$OUT_DIR/gpu_bench.md" ]; then
    echo "run_gpu_benchmarks: bench_gpu exit status $rc; summary in $OUT_DIR/gpu_bench.md" >&2
else
    echo "run_gpu_benchmarks: bench_gpu exit status $rc; no summary written" >&2
fi
exit "$rc"
