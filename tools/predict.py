#!/usr/bin/env python
"""Known class or `unknown` per image, from a trained run.

    python tools/predict.py --run runs/NAME PATH... [--out preds.csv|preds.json] [--batch-size 256] [--device auto]

PATH: image files, folders of images (recursive) or shard prefixes made by tools/make_shards.py.
The run's config.yaml, best checkpoint (weights + score statistics, safetensors) and the
threshold its summary.json chose on validation are restored; nothing in the run folder is
unpickled or executed. Each row: path, prediction (class name or `unknown`: score below the
threshold), score, threshold, closed-set class. Logic: cssr_dist.apps.predict.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come from the run folder, never the network

from cssr_dist.apps.predict import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
