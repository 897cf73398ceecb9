#!/usr/bin/env bash
# The prepared GPU run (issue 12 targets 1-5, issue 10 item 8): ~10 minutes on an H100/H200,
# every figure of benchmarks/bench_gpu.py in one go (see its docstring for the sections).
#
#   bash tools/run_gpu_benchmarks.sh                  # on the lent machine: `run` tool, timeout_s ~660
#   bash tools/run_gpu_benchmarks.sh --rehearse       # the same code paths at tiny sizes on a CPU (minutes)
#   BENCH_BUDGET_S=300 bash tools/run_gpu_benchmarks.sh --sections head ft
#
# Needs torch, torchvision, timm, numpy, accelerate (+ triton for the fused kernel), no wandb and
# no network. The GPU image has no webdataset: its pure-Python wheels travel with the checkout
# (`pip download --no-deps -d .whl webdataset==1.0.2 braceexpand` here, then the `run` tool's
# carry=[".whl"]) and go on PYTHONPATH below (a wheel is an importable zip). Writes under $OUT (the `run` tool's folder; else
# docs/benchmarks/gpu/run_<date>): gpu_bench.jsonl (one JSON line per measurement, appended as
# they finish), gpu_bench.md and scaling.md (rewritten after every job, so a killed run still
# leaves them), head.jsonl, gpu_bench.log (stdout+stderr) and nvidia-smi.txt. Jobs that would
# overrun BENCH_BUDGET_S are skipped with a JSON line saying so; BENCH_TIMEOUT_S is the hard
# limit (SIGTERM, then SIGKILL 10 s later). Exit status: bench_gpu's (0 all fine, 1 some
# measurement failed, 2 no CUDA device), 124/137 when the hard limit hit.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-docs/benchmarks/gpu/run_$(date +%Y%m%d_%H%M%S)}"
BUDGET_S="${BENCH_BUDGET_S:-560}"
TIMEOUT_S="${BENCH_TIMEOUT_S:-635}"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi

WHEELS=""
for wheel in .whl/*.whl; do [ -f "$wheel" ] && WHEELS="$WHEELS:$PWD/$wheel"; done
export PYTHONPATH="${PYTHONPATH:-.}$WHEELS" HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/cssr_inductor_cache}"
mkdir -p "$OUT_DIR"

{ command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi; } > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
echo "run_gpu_benchmarks: budget ${BUDGET_S} s, hard limit ${TIMEOUT_S} s, results in $OUT_DIR" >&2

timeout -k 10 "$TIMEOUT_S" "$PY" -m benchmarks.bench_gpu --budget-s "$BUDGET_S" --out "$OUT_DIR" "$@" \
    2>&1 | tee "$OUT_DIR/gpu_bench.log"
rc=${PIPESTATUS[0]}
if [ -f "$OUT_DIR/gpu_bench.md" ]; then
    echo "run_gpu_benchmarks: bench_gpu exit status $rc; summary in $OUT_DIR/gpu_bench.md and $OUT_DIR/scaling.md" >&2
else
    echo "run_gpu_benchmarks: bench_gpu exit status $rc; no summary written" >&2
fi
exit "$rc"
