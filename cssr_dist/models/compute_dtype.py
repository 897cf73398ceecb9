"""The dtype a CSSR distance kernel computes in, shared by the chunked path and the fused Triton kernels."""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Autocast's dtype when autocast is on (so bf16/fp16 GEMMs), else the promoted dtype."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
