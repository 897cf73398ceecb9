#!/usr/bin/env bash
# Sets up (tools/setup.sh --dev) and runs the whole test suite on CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh --dev
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1
# A hard limit, so that a hung test process still ends CI with its report (CI allows 90 min).
exec timeout --kill-after=60 3600 .venv/bin/python -m pytest -q --durations=15 "$@"
