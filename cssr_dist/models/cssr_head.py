"""PCSSR / RCSSR head: one auto-encoder per class, all classes evaluated together.

    z_k(p) = sign * gamma * || AE_k(x_p) - x_p ||      clamped to [-clamp, clamp]

(docs/method.md §1; sign -1 = PCSSR, +1 = RCSSR; L1 norm, or squared L2.)

The K auto-encoders are stored as batched weights ([K, out, in] per layer, i.e. K 1x1
convs without bias) so every layer is ONE GEMM over all classes. The last decoder layer,
whose output would be the [K, C, N] reconstruction (N = B*H*W), is never materialised:

* L1: `l1_distance`: `chunked_l1_distance` walks class chunks and recomputes in backward,
  or (`l1_kernel`) the fused Triton kernels keep each residual tile in registers;
* L2: the closed form ||D h - x||^2 = h^T (D^T D) h - 2 (D^T x).h + ||x||^2 needs only
  [K, L, N] tensors. It is evaluated in float32 (it subtracts large numbers).

`reference_cssr_logits` is the reference implementation's per-class Python loop, kept as
the executable specification for tests and benchmarks.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cssr_l1_function import L1_KERNELS, l1_distance
from .linear_head import projection_block

__all__ = ["CSSRHead", "l2_distance_closed_form", "reference_cssr_logits"]

DISTANCES = ("l1", "l2")


def _batched_weight(num_classes: int, out_dim: int, in_dim: int) -> nn.Parameter:
    """K 1x1-conv weights with PyTorch's default conv init (uniform +-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(in_dim)
    return nn.Parameter(torch.empty(num_classes, out_dim, in_dim).uniform_(-bound, bound))


def l2_distance_closed_form(x: torch.Tensor, codes: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
    """||D_k h_k[:, n] - x[:, n]||^2 for all k, n without forming D h: x [C,N], codes [K,L,N], dec [K,C,L] -> [K,N]."""
    dtype = torch.float32
    for t in (x, codes, dec):
        dtype = torch.promote_types(dtype, t.dtype)
    with torch.autocast(x.device.type, enabled=False):
        x, codes, dec = x.to(dtype), codes.to(dtype), dec.to(dtype)
        num_classes, latent, channels = codes.shape[0], codes.shape[1], x.shape[0]
        gram = torch.bmm(dec.transpose(1, 2), dec)  # [K, L, L]
        dec_t_x = (dec.transpose(1, 2).reshape(num_classes * latent, channels) @ x).view_as(codes)  # [K, L, N]
        quad = torch.bmm(gram, codes) - 2.0 * dec_t_x
        return (codes * quad).sum(1) + x.square().sum(0)


class CSSRHead(nn.Module):
    """K class-specific auto-encoders scored by reconstruction error at every pixel."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        latent: int = 64,
        gamma: float = 0.1,
        sign: int = 1,
        distance: str = "l1",
        hidden: Sequence[int] = (),
        projection_dim: int | None = None,
        clamp: float | None = 100.0,
        class_chunk: int | None = None,
        l1_kernel: str = "auto",
    ):
        super().__init__()
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 (rcssr) or -1 (pcssr), got {sign}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if l1_kernel not in L1_KERNELS:
            raise ValueError(f"l1_kernel must be one of {L1_KERNELS}, got {l1_kernel!r}")
        self.projection = projection_block(in_channels, projection_dim) if projection_dim else nn.Identity()
        self.feature_dim = projection_dim or in_channels
        self.num_classes = num_classes
        self.scale = float(sign) * float(gamma)
        self.distance = distance
        self.clamp = clamp
        self.class_chunk = class_chunk
        self.l1_kernel = l1_kernel
        enc_dims = [self.feature_dim, *hidden, latent]
        dec_dims = enc_dims[::-1]
        self.encoders = nn.ParameterList(
            _batched_weight(num_classes, o, i) for i, o in zip(enc_dims[:-1], enc_dims[1:])
        )
        self.decoders = nn.ParameterList(
            _batched_weight(num_classes, o, i) for i, o in zip(dec_dims[:-1], dec_dims[1:])
        )

    def _last_codes(self, x_cn: torch.Tensor) -> torch.Tensor:
        """Every layer except the last decoder, batched over classes: [C, N] -> [K, L_last, N]."""
        first = self.encoders[0]
        k, out_dim, in_dim = first.shape
        h = torch.tanh((first.reshape(k * out_dim, in_dim) @ x_cn).view(k, out_dim, -1))
        # indexing, not ParameterList slicing: torch 2.11's dynamo breaks the graph on slices
        for w in [self.encoders[i] for i in range(1, len(self.encoders))] + [self.decoders[i] for i in range(len(self.decoders) - 1)]:
            h = torch.tanh(torch.bmm(w, h))
        return h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.projection(x)
        return features, self.logits_from_features(features)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """The logit map [B, K, H, W] of already projected features (also for post-hoc
        detectors that modify them first)."""
        b, c, hgt, wid = features.shape
        x_cn = features.transpose(0, 1).reshape(c, b * hgt * wid)
        codes = self._last_codes(x_cn)
        if self.distance == "l1":
            dist = l1_distance(x_cn, codes, self.decoders[-1], self.class_chunk, self.l1_kernel)
        else:
            dist = l2_distance_closed_form(x_cn, codes, self.decoders[-1])
        logits = dist * self.scale
        if self.clamp is not None and self.clamp > 0:
            logits = logits.clamp(-self.clamp, self.clamp)
        return logits.view(self.num_classes, b, hgt * wid).transpose(0, 1).reshape(b, self.num_classes, hgt, wid)


def reference_cssr_logits(
    x: torch.Tensor,
    enc_w: torch.Tensor | Sequence[torch.Tensor],
    dec_w: torch.Tensor | Sequence[torch.Tensor],
    sign: int = 1,
    gamma: float = 0.1,
    distance: str = "l1",
    clamp: float | None = 100.0,
) -> torch.Tensor:
    """The reference implementation's structure: a Python loop of per-class 1x1-conv AEs.

    x: [B, C, H, W] (already projected); enc_w / dec_w: one [K, out, in] tensor per layer
    (or a single tensor for the default one-layer encoder / decoder). Every layer is
    followed by tanh except the last decoder layer. Returns [B, K, H, W]. Slow and memory
    hungry on purpose: it is the specification the batched head is tested against.
    """
    enc = [enc_w] if isinstance(enc_w, torch.Tensor) else list(enc_w)
    dec = [dec_w] if isinstance(dec_w, torch.Tensor) else list(dec_w)
    per_class = []
    for k in range(enc[0].shape[0]):
        out = x
        for w in enc:
            out = torch.tanh(F.conv2d(out, w[k][:, :, None, None]))
        for i, w in enumerate(dec):
            out = F.conv2d(out, w[k][:, :, None, None])
            if i < len(dec) - 1:
                out = torch.tanh(out)
        if distance == "l1":
            err = torch.norm(out - x, p=1, dim=1, keepdim=True)
        else:
            err = torch.norm(out - x, p=2, dim=1, keepdim=True) ** 2
        err = err * (sign * gamma)
        if clamp is not None and clamp > 0:
            err = torch.clamp(err, -clamp, clamp)
        per_class.append(err)
    return torch.cat(per_class, dim=1)
