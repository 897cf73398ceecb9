"""Convert a weight file of another layout onto a timm model, written as safetensors.

    cssr-convert-weights SOURCE.pth MODEL_NAME OUT.safetensors
    cssr-convert-weights efficientnet-lite0-57934424.pth tf_efficientnet_lite0 lite0.safetensors

Tensors are matched by ORDER with a shape check on every pair (the file must be the same
architecture under other key names, with or without its classifier); any mismatch refuses
with one line naming the first mismatching pair, and nothing is written. The result loads
by name: `model.backbone=MODEL_NAME model.pretrained_file=OUT.safetensors`. Only tensors are
read (safetensors, or torch.load with weights_only=True). Logic: cssr_dist.models.pretrained.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import CssrError, report
from ..models.backbones import check_backbone_name
from ..models.pretrained import convert_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="weight file (.pth/.pt/.bin state dict or .safetensors)")
    parser.add_argument("model", help="timm model name, e.g. tf_efficientnet_lite0")
    parser.add_argument("out", help="output .safetensors file")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        print(f"error: {args.out} must end in .safetensors", file=sys.stderr)
        return 2
    try:
        check_backbone_name(args.model)
        done = convert_weights(args.source, args.model, args.out)
    except CssrError as err:
        return report(err)
    head = "with" if done.classifier else "without"
    print(f"wrote {done.path}: {done.tensors} tensors of {done.model} ({head} classifier), matched by order")
    return 0


if __name__ == "__main__":
    sys.exit(main())
