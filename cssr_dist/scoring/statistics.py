"""Training-set statistics behind the S1, S2 and integrated CSSR scores (docs/method.md §3).

The statistics are MODEL STATE: they are buffers of :class:`ScoreStatistics`, so they go
into ``state_dict`` / checkpoints and evaluation restores them instead of recomputing.
They are kept as SUMS plus COUNTS (never running means) so that a plain all-reduce SUM
across ranks gives exactly the count-weighted statistics of the whole training set; every
derived quantity (prototype, mean Gram, z-norm mean/std) is a ratio of sums, so reducing
twice only scales numerator and denominator alike and changes nothing.

How the engine fills them (two passes over the training set, model in eval mode):

1. pass 1 with TEST transforms: ``update_class_stats(features, pred)`` per batch, then
   ``reduce_(all_reduce_sum, which="class")``;
2. pass 2 with TEST transforms: ``compute_scores(...)`` (S0, S1, S2 now available) and
   ``update_moments(scores)`` per batch, then ``reduce_(all_reduce_sum, which="moments")``.

The CSSR reference runs pass 1 on test-transformed images but pass 2 on STRONGLY
AUGMENTED training images (its test-mode flag is reset before the second pass). The clean
protocol runs both passes with test transforms, so the moments describe the same image
distribution the scores are later computed on; the reference protocol
(``eval.stats_transform=train``) reproduces the reference's pass 2.

Buffers are float64 and keep that dtype under ``module.half()`` / ``.to(dtype)`` (only
device moves apply): counts reach 1e6 and Gram sums 1e20, beyond what fp16/bf16 hold.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

__all__ = ["ScoreStatistics", "gram_matrix", "DEFAULT_SCORE_NAMES", "GRAM_POWER"]

DEFAULT_SCORE_NAMES = ("s0", "s1", "s2")
GRAM_POWER = 8
#: z-normalisation divides by (std + ZNORM_EPS), as the reference does.
ZNORM_EPS = 1e-8

_CPU_GRAM_CHUNK_BYTES = 1 << 20
_CLASS_BUFFERS = ("proto_sum", "proto_count", "gram_sum", "gram_count")
_MOMENT_BUFFERS = ("moments",)


@torch.no_grad()
def gram_matrix(features: Tensor, power: int = GRAM_POWER) -> Tensor:
    """Per-sample Gram matrix G = signed p-th root of (X^p)(X^p)^T, X = x as C x HW.

    Powers are element-wise. Returns float64 [B, C, C].

    Overflow guard: x^8 overflows fp16 at |x| > 3.3 and float32 at |x| > ~4e4 once summed
    over pixels. G is homogeneous of degree 2 (x -> s x gives G -> s^2 G), so each
    sample is divided by its max |x| before the powers (all values in [0, 1], nothing
    overflows) and G is multiplied by the square of that scale afterwards. Computed in
    float64 on the features' device, so underflow only drops entries below ~1e-19 of the
    sample's largest activation.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be [B, C, H, W], got shape {tuple(features.shape)}")
    if power < 1:
        raise ValueError(f"gram power must be >= 1, got {power}")
    x = features.detach().to(torch.float64).flatten(2)  # [B, C, HW]
    scale = x.abs().amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    xp = x / scale
    pow2 = power & (power - 1) == 0  # p = 2^j: j squarings / square roots, 2-3x faster than pow
    if pow2:
        for _ in range(power.bit_length() - 1):
            xp.square_()
    else:
        xp = xp.pow(power)
    m = torch.bmm(xp, xp.transpose(1, 2))
    # even p: every product is >= 0, so m >= 0 exactly and can be rooted in place
    g = m if power % 2 == 0 else m.abs()
    if pow2:
        for _ in range(power.bit_length() - 1):
            g.sqrt_()
    else:
        g.pow_(1.0 / power)
    if power % 2:  # odd p: signed root
        g.mul_(m.sign())
    return g.mul_(scale.square())


class ScoreStatistics(nn.Module):
    """Per-class prototypes / Gram sums and per-score moments, as all-reducible buffers.

    Args:
        num_classes: K known classes.
        channels: C, the feature map's channel count.
        use_gram: keep the [K, C, C] Gram sums (S2). Costs 8*K*C^2 bytes: 5 MB for
            K=10, C=256, but 2 GB for ImageNet (K=1000, C=512), where S0 alone is used.
        score_names: raw scores that are z-normalised and summed into "integrated";
            default ("s0", "s1", "s2"), or ("s0", "s1") when ``use_gram`` is False.
        gram_power: the element-wise power p of the Gram score (8 in CSSR).

    Buffers (float64): ``proto_sum`` [K, C] (sum over samples of mean_p |x|),
    ``proto_count`` [K], ``gram_sum`` [K, C, C], ``gram_count`` [K] (both absent when
    ``use_gram`` is False), ``moments`` [len(score_names), 3] (count, sum, sum of squares).
    Keep the module on the features' device: updates then never copy to the host.
    """

    def __init__(
        self,
        num_classes: int,
        channels: int,
        use_gram: bool = True,
        score_names: Optional[Iterable[str]] = None,
        gram_power: int = GRAM_POWER,
    ) -> None:
        super().__init__()
        if num_classes < 1 or channels < 1:
            raise ValueError(f"num_classes and channels must be >= 1, got {num_classes}, {channels}")
        self.num_classes = int(num_classes)
        self.channels = int(channels)
        self.use_gram = bool(use_gram)
        if score_names is None:  # S2 only exists with Gram statistics
            score_names = DEFAULT_SCORE_NAMES if self.use_gram else DEFAULT_SCORE_NAMES[:2]
        self.score_names = tuple(score_names)
        if len(set(self.score_names)) != len(self.score_names):
            raise ValueError(f"score_names must be unique, got {self.score_names}")
        self.gram_power = int(gram_power)
        f64 = dict(dtype=torch.float64)
        self.register_buffer("proto_sum", torch.zeros(num_classes, channels, **f64))
        self.register_buffer("proto_count", torch.zeros(num_classes, **f64))
        if self.use_gram:
            self.register_buffer("gram_sum", torch.zeros(num_classes, channels, channels, **f64))
            self.register_buffer("gram_count", torch.zeros(num_classes, **f64))
        else:
            self.register_buffer("gram_sum", None)
            self.register_buffer("gram_count", None)
        self.register_buffer("moments", torch.zeros(len(self.score_names), 3, **f64))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, channels={self.channels}, use_gram={self.use_gram}, "
            f"score_names={self.score_names}"
        )

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "ScoreStatistics":
        # Follow device moves, ignore dtype casts (model.half() must not round the sums).
        def keep_dtype(t: Tensor) -> Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(device=out.device)

        return super()._apply(keep_dtype, recurse)

    # ----------------------------------------------------------------- accumulation
    @torch.no_grad()
    def update_class_stats(self, features: Tensor, preds: Tensor) -> None:
        """Add a batch to the per-PREDICTED-class sums; batched over classes with index_add_.

        features [B, C, H, W] (any float dtype), preds [B] int in [0, K). No host sync.
        """
        if features.ndim != 4 or features.shape[1] != self.channels:
            raise ValueError(
                f"features must be [B, {self.channels}, H, W], got shape {tuple(features.shape)}"
            )
        if preds.shape != features.shape[:1]:
            raise ValueError(f"preds must be [{features.shape[0]}], got shape {tuple(preds.shape)}")
        dev = self.proto_sum.device
        idx = preds.to(device=dev, dtype=torch.long)
        mean_abs = features.detach().abs().mean(dim=(2, 3), dtype=torch.float64).to(dev)
        ones = torch.ones(idx.shape[0], dtype=torch.float64, device=dev)
        self.proto_sum.index_add_(0, idx, mean_abs)
        self.proto_count.index_add_(0, idx, ones)
        if self.use_gram:
            # On CPU the element-wise root is memory bound: chunks of ~1 MiB of Gram matrices
            # stay in cache (2.5x faster at C=256). Accelerators take the whole batch at once.
            b = idx.shape[0]
            step = b if features.device.type != "cpu" else max(1, _CPU_GRAM_CHUNK_BYTES // (8 * self.channels**2))
            for lo in range(0, b, step):
                g = gram_matrix(features[lo : lo + step], self.gram_power).to(dev)
                self.gram_sum.index_add_(0, idx[lo : lo + step], g)
            self.gram_count.index_add_(0, idx, ones)

    @torch.no_grad()
    def update_moments(self, raw: Mapping[str, Tensor]) -> None:
        """Add a batch of raw scores (every name in ``score_names``, each [B]). No host sync."""
        missing = [n for n in self.score_names if n not in raw]
        if missing:
            raise KeyError(f"update_moments needs scores {missing}; got {sorted(raw)}")
        dev = self.moments.device
        v = torch.stack([raw[n].detach().to(device=dev, dtype=torch.float64).flatten() for n in self.score_names])
        self.moments += torch.stack([torch.ones_like(v).sum(1), v.sum(1), v.square().sum(1)], dim=1)

    def _buffer_names(self, which: str) -> tuple[str, ...]:
        groups = {"class": _CLASS_BUFFERS, "moments": _MOMENT_BUFFERS, "all": _CLASS_BUFFERS + _MOMENT_BUFFERS}
        if which not in groups:
            raise ValueError(f"which must be one of {sorted(groups)}, got {which!r}")
        return tuple(n for n in groups[which] if getattr(self, n) is not None)

    @torch.no_grad()
    def reduce_(self, reduce_fn: Callable[[Tensor], Tensor], which: str = "all") -> None:
        """Replace each buffer (of group "class", "moments" or "all") with reduce_fn(buffer).

        The engine passes an all-reduce SUM (e.g. ``lambda t: accelerator.reduce(t, "sum")``);
        because buffers are sums and counts, the result is the count-weighted statistic of
        all ranks. Call it on every rank, in the same order (it is a collective).
        """
        for name in self._buffer_names(which):
            buf = getattr(self, name)
            out = reduce_fn(buf)
            if out.shape != buf.shape:
                raise ValueError(f"reduce_fn changed the shape of {name}: {tuple(buf.shape)} -> {tuple(out.shape)}")
            buf.copy_(out)

    @torch.no_grad()
    def reset_(self, which: str = "all") -> None:
        """Zero the sums (before re-measuring, e.g. after more training)."""
        for name in self._buffer_names(which):
            getattr(self, name).zero_()

    # ----------------------------------------------------------------- readiness
    @property
    def class_stats_ready(self) -> bool:
        """True once any sample has been added to the class sums (host sync: call per pass)."""
        ok = bool(self.proto_count.sum() > 0)
        return ok and (not self.use_gram or bool(self.gram_count.sum() > 0))

    @property
    def moments_ready(self) -> bool:
        """True once every score in ``score_names`` has at least one sample."""
        return bool(self.moments.numel() > 0 and self.moments[:, 0].min() > 0)

    @property
    def ready(self) -> bool:
        return self.class_stats_ready and self.moments_ready

    # ----------------------------------------------------------------- derived values
    def prototypes(self) -> Tensor:
        """[K, C] float64: mean |x| per predicted class, each channel normalised over classes.

        u_c / sum_c' u_c'. A class never predicted has a zero prototype; a channel that is
        zero for every class stays zero (the reference divides 0 by 0 there).
        """
        u = self.proto_sum / self.proto_count.clamp_min(1.0).unsqueeze(1)
        denom = u.sum(dim=0, keepdim=True)
        return torch.where(denom > 0, u / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(u))

    def gram_means(self) -> Tensor:
        """[K, C, C] float64: mean Gram matrix per predicted class (zero for unseen classes)."""
        if not self.use_gram:
            raise RuntimeError("gram_means() needs ScoreStatistics(use_gram=True)")
        return self.gram_sum / self.gram_count.clamp_min(1.0).view(-1, 1, 1)

    def zstats(self, name: str) -> tuple[Tensor, Tensor]:
        """(mean, std) of raw score ``name`` over the training set, 0-dim float64 tensors.

        Population std (numpy's default, as the reference). NaN before any update.
        """
        if name not in self.score_names:
            raise KeyError(f"no moments for score {name!r}; score_names={self.score_names}")
        n, s, ss = self.moments[self.score_names.index(name)].unbind()
        mean = s / n
        var = (ss / n - mean.square()).clamp_min(0.0)
        return mean, var.sqrt()
