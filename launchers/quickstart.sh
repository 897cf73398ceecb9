#!/usr/bin/env bash
# One command from a fresh machine to a finished experiment: set up, then run the built-in
# default (RCSSR on real Fashion-MNIST, CPU) and print its metrics table.
#   bash launchers/quickstart.sh [key=value overrides ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export HF_HUB_OFFLINE=1
# No W&B key here means offline W&B files under runs/<name>/wandb (sync later with `wandb sync`).
# launchers/launch.py = accelerate launch whose failed run ends in its one `error:` line (no traceback)
exec .venv/bin/python launchers/launch.py --config_file launchers/cpu_1proc.yaml --num_cpu_threads_per_process "$(nproc)" train.py "$@"
