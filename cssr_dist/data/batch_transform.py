"""Split a per-image transform at `ToTensor`: PIL work per image, tensor work per batch.

Why: a loader worker that runs `ToTensor + Normalize` per image allocates and writes two
float images per sample and then stacks them into a fresh float batch; measured on the dev
VM (docs/benchmarks/data.md) the float work is ~18% and the stacking another ~16% of
decode + transform at 224 px. Cut at `ToTensor`, the per-image part ends at a uint8 tensor
(`PILToTensor`), the uint8 images are stacked (a quarter of the bytes) and the batch is
converted and normalised once, in place, into its output buffer (shared memory when in a
loader worker, so it is not copied again on its way to the main process). The numbers
are the same: `ToTensor` is `PILToTensor` then `/255`, and `Normalize` broadcasts over a
batch; any other tensor transform (the per-image random `ManualContrast`) runs per image.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch
from torch.utils.data import get_worker_info
from torchvision import transforms as tv_transforms
from torchvision.transforms import functional as tv_functional


def empty_batch(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, pin_memory: bool = False) -> torch.Tensor:
    """An uninitialised tensor, in shared memory inside a DataLoader worker (as default_collate
    allocates its batches), so sending it to the main process moves no bytes; in the main
    process optionally pinned (CUDA's caching host allocator) for asynchronous copies."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def main_process_has_a_core(num_workers: int) -> bool:
    """True when every loader process of this node (each local rank's main process and its
    workers) can have a CPU core of its own: then the batch stage runs in the main process and
    only uint8 crosses the process boundary; otherwise it stays in the workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return num_workers > 0 and local_ranks * (num_workers + 1) <= cores


class BatchTail:
    """The tensor stage of a transform, applied to a uint8 batch [B, C, H, W] -> float32."""

    def __init__(self, transforms: list[Callable]) -> None:
        self.transforms = transforms

    def __call__(self, batch: torch.Tensor, pin_memory: bool = False) -> torch.Tensor:
        x = empty_batch(tuple(batch.shape), pin_memory=pin_memory)
        x.copy_(batch).div_(255)
        for t in self.transforms:
            if isinstance(t, tv_transforms.Normalize):
                tv_functional.normalize(x, t.mean, t.std, inplace=True)
            else:
                for i in range(len(x)):
                    x[i] = t(x[i])
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ToTensor, {', '.join(map(repr, self.transforms))})"


def split_at_to_tensor(transform: Callable | None) -> tuple[Callable | None, BatchTail | None]:
    """(per-image part ending in uint8 `PILToTensor`, batch part) of a `Compose` with `ToTensor`.

    Anything else (no Compose, no ToTensor) is returned whole with no batch part.
    """
    if not isinstance(transform, tv_transforms.Compose):
        return transform, None
    steps = transform.transforms
    cut = next((i for i, t in enumerate(steps) if isinstance(t, tv_transforms.ToTensor)), None)
    if cut is None:
        return transform, None
    return tv_transforms.Compose([*steps[:cut], tv_transforms.PILToTensor()]), BatchTail(steps[cut + 1:])
