#!/usr/bin/env python
"""Convert a weight file of another layout onto a timm model, written as safetensors.

    python tools/convert_weights.py SOURCE.pth MODEL_NAME OUT.safetensors
    python tools/convert_weights.py efficientnet-lite0-57934424.pth tf_efficientnet_lite0 lite0.safetensors

Tensors are matched by ORDER with a shape check on every pair (the file must be the same
architecture under other key names, with or without its classifier); any mismatch refuses
with one line naming the first mismatching pair, and nothing is written. The result loads
by name: `model.backbone=MODEL_NAME model.pretrained_file=OUT.safetensors`. Only tensors are
read (safetensors, or torch.load with weights_only=True). Logic: cssr_dist.models.pretrained.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # building the timm model never needs the network

from cssr_dist.errors import CssrError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="weight file (.pth/.pt/.bin state dict or .safetensors)")
    parser.add_argument("model", help="timm model name, e.g. tf_efficientnet_lite0")
    parser.add_argument("out", help="output .safetensors file")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        print(f"error: {args.out} must end in .safetensors", file=sys.stderr)
        return 2
    from cssr_dist.models.backbones import check_backbone_name
    from cssr_dist.models.pretrained import convert_weights

    try:
        check_backbone_name(args.model)
        done = convert_weights(args.source, args.model, args.out)
    except CssrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    head = "with" if done.classifier else "without"
    print(f"wrote {done.path}: {done.tensors} tensors of {done.model} ({head} classifier), matched by order")
    return 0


if __name__ == "__main__":
    sys.exit(main())
