"""Per-sample open-set scores (higher = more likely KNOWN) and a registry to pick them by name.

Inputs are one model output: features x [B, C, H, W] and the per-pixel logit map
z [B, K, H, W]. Heads work per pixel; every score averages over pixels (docs/method.md §3).

* ``s0``: the head score. RCSSR: mean_p z_pred(p). PCSSR: mean_p z_pred(p) / m(p)^2 with
  m(p) = mean_c |x_c(p)| + PCSSR_EPS (the reference divides by zero for an all-zero
  feature vector). Linear head: MSP.
* ``s1``: class-prototype score, mean over channels and pixels of u_pred * x.
* ``s2``: Gram score, sum(G_test * Gmean_pred).
* ``integrated``: sum over ``stats.score_names`` of (s - mean) / (std + 1e-8).
* ``msp``, ``mls``, ``energy``: cheap baselines on any head.

S1, S2 and the z-normalisation use :class:`ScoreStatistics` measured on the training set
with TEST transforms; the reference protocol takes the z-normalisation moments alone from
strongly augmented images, as the reference code (see statistics.py).

One protocol for every score (OpenOOD's postprocessors are the pattern): a :class:`Scorer`
is made once per model, `fit` on training data, then called on a batch of model outputs;
the head kind lives inside it and pooling is the loss's (`models/losses.py`), so the
prediction, MSP and the training loss never disagree. Plug-ins: ``@register_score("name")``
on a function ``(ctx: ScoreContext) -> Tensor[B] | None`` (None = not available, e.g. no
statistics yet). Scores are float64 [B].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..models.losses import class_log_probs, loss_kind_for_head
from .statistics import ZNORM_EPS, ScoreStatistics, gram_matrix

__all__ = [
    "HEAD_KINDS",
    "PCSSR_EPS",
    "SCORE_REGISTRY",
    "ScoreContext",
    "register_score",
    "get_score_fn",
    "Scorer",
    "primary_score",
    "s0",
    "s1",
    "s2",
    "msp",
    "mls",
    "energy",
    "integrated",
    "compute_scores",
]

HEAD_KINDS = ("linear", "pcssr", "rcssr")
#: added to m(p) = mean_c |x_c(p)| before squaring in the PCSSR score.
PCSSR_EPS = 1e-6


def _check_head_kind(head_kind: str) -> None:
    if head_kind not in HEAD_KINDS:
        raise ConfigError(f"model head kind {head_kind!r} is unknown; use one of {', '.join(HEAD_KINDS)}")


def _pixel_mean_logits(logits: Tensor) -> Tensor:
    return logits.float().mean(dim=(2, 3))


def _log_probs(head_kind: str, logits: Tensor) -> Tensor:
    """Pooled class log-probabilities [B, K], pooled exactly as the head's loss pools them."""
    return class_log_probs(logits, loss_kind_for_head(head_kind)).float()


def _predicted(head_kind: str, logits: Tensor) -> Tensor:
    return _log_probs(head_kind, logits).argmax(dim=1)


def msp(head_kind: str, logits: Tensor) -> Tensor:
    """Maximum (pooled) softmax probability [B]."""
    return _log_probs(head_kind, logits).max(dim=1).values.exp().double()


def mls(logits: Tensor) -> Tensor:
    """Maximum of the pixel-mean logits [B] (Vaze et al.'s MLS)."""
    return _pixel_mean_logits(logits).max(dim=1).values.double()


def energy(logits: Tensor) -> Tensor:
    """Negative free energy at T=1: logsumexp of the pixel-mean logits [B] (higher = known)."""
    return torch.logsumexp(_pixel_mean_logits(logits).double(), dim=1)


def _class_map(logits: Tensor, pred: Tensor) -> Tensor:
    """z_pred(p): the logit map of each sample's predicted class, [B, H, W]."""
    b, _, h, w = logits.shape
    idx = pred.view(b, 1, 1, 1).expand(b, 1, h, w)
    return logits.gather(1, idx).squeeze(1).double()


def s0(head_kind: str, features: Tensor, logits: Tensor, pred: Optional[Tensor] = None) -> Tensor:
    """Head score [B]: RCSSR mean_p z_pred; PCSSR mean_p z_pred / (m(p) + eps)^2; linear MSP."""
    _check_head_kind(head_kind)
    if head_kind == "linear":
        return msp(head_kind, logits)
    if pred is None:
        pred = _predicted(head_kind, logits)
    z = _class_map(logits, pred)
    if head_kind == "rcssr":
        return z.mean(dim=(1, 2))
    m = features.double().abs().mean(dim=1) + PCSSR_EPS  # [B, H, W]
    return (z / m.square()).mean(dim=(1, 2))


def s1(features: Tensor, pred: Tensor, prototypes: Tensor) -> Tensor:
    """Prototype score [B]: mean over channels and pixels of u_pred * x."""
    u = prototypes.to(device=features.device, dtype=torch.float64)[pred]  # [B, C]
    return (features.double().mean(dim=(2, 3)) * u).mean(dim=1)


def s2(features: Tensor, pred: Tensor, gram_means: Tensor, power: int = 8) -> Tensor:
    """Gram score [B]: sum over the C x C entries of G_test * Gmean_pred."""
    g = gram_matrix(features, power)
    gm = gram_means.to(device=g.device, dtype=torch.float64)[pred]
    return (g * gm).sum(dim=(1, 2))


def integrated(raw: dict[str, Tensor], stats: ScoreStatistics) -> Tensor:
    """sum_n (raw[n] - mean_n) / (std_n + 1e-8) over ``stats.score_names`` [B]."""
    total = None
    for name in stats.score_names:
        mean, std = stats.zstats(name)
        v = raw[name].double()
        z = (v - mean.to(v.device)) / (std.to(v.device) + ZNORM_EPS)
        total = z if total is None else total + z
    return total


# --------------------------------------------------------------------------- registry
@dataclass
class ScoreContext:
    """One batch's inputs to the score functions, with a cache so scores reuse each other."""

    head_kind: str
    features: Tensor
    logits: Tensor
    stats: Optional[ScoreStatistics] = None
    cache: dict[str, Optional[Tensor]] = field(default_factory=dict)
    _pred: Optional[Tensor] = field(default=None, init=False, repr=False)
    _class_ready: Optional[bool] = field(default=None, init=False, repr=False)
    _moments_ready: Optional[bool] = field(default=None, init=False, repr=False)

    @property
    def pred(self) -> Tensor:
        if self._pred is None:
            self._pred = _predicted(self.head_kind, self.logits)
        return self._pred

    @property
    def class_ready(self) -> bool:
        if self._class_ready is None:
            self._class_ready = self.stats is not None and self.stats.class_stats_ready
        return self._class_ready

    @property
    def moments_ready(self) -> bool:
        if self._moments_ready is None:
            self._moments_ready = self.stats is not None and self.stats.moments_ready
        return self._moments_ready

    def get(self, name: str) -> Optional[Tensor]:
        """Score ``name`` for this batch (computed once), or None if not available."""
        if name not in self.cache:
            self.cache[name] = get_score_fn(name)(self)
        return self.cache[name]


ScoreFn = Callable[[ScoreContext], Optional[Tensor]]
#: name -> score function; registration order is the order of :func:`compute_scores`.
SCORE_REGISTRY: dict[str, ScoreFn] = {}


def register_score(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator adding a score function to :data:`SCORE_REGISTRY` under ``name``."""

    def deco(fn: ScoreFn) -> ScoreFn:
        if name in SCORE_REGISTRY or name == "pred":
            raise ValueError(f"score {name!r} is already registered")
        SCORE_REGISTRY[name] = fn
        return fn

    return deco


def get_score_fn(name: str) -> ScoreFn:
    try:
        return SCORE_REGISTRY[name]
    except KeyError:
        raise ConfigError(f"score {name!r} is unknown; available: {', '.join(SCORE_REGISTRY)}") from None


@register_score("s0")
def _s0(ctx: ScoreContext) -> Tensor:
    return s0(ctx.head_kind, ctx.features, ctx.logits, ctx.pred)


@register_score("msp")
def _msp(ctx: ScoreContext) -> Tensor:
    return msp(ctx.head_kind, ctx.logits)


@register_score("mls")
def _mls(ctx: ScoreContext) -> Tensor:
    return mls(ctx.logits)


@register_score("energy")
def _energy(ctx: ScoreContext) -> Tensor:
    return energy(ctx.logits)


@register_score("s1")
def _s1(ctx: ScoreContext) -> Optional[Tensor]:
    if not ctx.class_ready:
        return None
    return s1(ctx.features, ctx.pred, ctx.stats.prototypes())


@register_score("s2")
def _s2(ctx: ScoreContext) -> Optional[Tensor]:
    if not ctx.class_ready or not ctx.stats.use_gram:
        return None
    return s2(ctx.features, ctx.pred, ctx.stats.gram_means(), ctx.stats.gram_power)


@register_score("integrated")
def _integrated(ctx: ScoreContext) -> Optional[Tensor]:
    if not ctx.moments_ready:
        return None
    raw = {n: ctx.get(n) for n in ctx.stats.score_names}
    if any(v is None for v in raw.values()):
        return None
    return integrated(raw, ctx.stats)


@torch.no_grad()
def compute_scores(
    head_kind: str,
    features: Tensor,
    logits: Tensor,
    stats: Optional[ScoreStatistics] = None,
    names: Optional[Iterable[str]] = None,
) -> dict[str, Tensor]:
    """Scores for one batch: {"pred": int64 [B], <score>: float64 [B], ...}.

    With ``names=None``: every registered score that is available, i.e. always pred, s0,
    msp, mls, energy; s1 (and s2 with ``use_gram``) once ``stats`` has class statistics;
    integrated once it also has moments. With explicit ``names``, a requested score that
    is not available raises ConfigError. Readiness costs one host sync per call.
    """
    _check_head_kind(head_kind)
    if features.ndim != 4 or logits.ndim != 4 or features.shape[0] != logits.shape[0]:
        raise ValueError(
            f"need features [B,C,H,W] and logits [B,K,H,W], got {tuple(features.shape)} and {tuple(logits.shape)}"
        )
    ctx = ScoreContext(head_kind, features, logits, stats)
    out: dict[str, Tensor] = {"pred": ctx.pred}
    for name in SCORE_REGISTRY if names is None else names:
        value = ctx.get(name)
        if value is None:
            if names is not None:
                raise ConfigError(
                    f"score {name!r} needs training-set statistics that are not measured yet "
                    "(S1/S2 need class statistics, integrated also needs moments); "
                    "measure them first or choose s0/msp/mls/energy"
                )
            continue
        out[name] = value
    return out


# --------------------------------------------------------------------------- the protocol
STATISTICS_SCORES = ("s1", "s2", "integrated")


def primary_score(head_kind: str, method: str, requested: str) -> str:
    """'auto': integrated S0+S1+S2 for CSSR from scratch, S0 for fine-tuning, MSP for linear."""
    if requested != "auto":
        get_score_fn(requested)
        return requested
    if head_kind == "linear":
        return "msp"
    return "s0" if method == "cssr_ft" else "integrated"


class Scorer:
    """Every score of one model: `fit` on training data once, then score batches.

    Statistics (prototypes, Gram means, z-normalisation moments) are fitted only when the
    primary score needs them; the baselines that need nothing (s0, msp, mls, energy) are
    always there. `reduce` sums a tensor over ranks, so the fitted state is the same
    everywhere whatever each rank saw.
    """

    def __init__(self, head_kind: str, num_classes: int, channels: int, primary: str):
        _check_head_kind(head_kind)
        self.head_kind, self.primary = head_kind, primary
        self.needs_fit = primary in STATISTICS_SCORES
        self.stats = ScoreStatistics(num_classes, channels, use_gram=self.needs_fit)

    def to(self, device: torch.device) -> "Scorer":
        self.stats.to(device)
        return self

    def classify(self, logits: Tensor) -> Tensor:
        """Closed-set prediction [B] (argmax of the loss's pooled probabilities)."""
        return _predicted(self.head_kind, logits)

    @torch.no_grad()
    def fit(self, outputs: Callable[[], Iterable[tuple[Tensor, Tensor]]], reduce: Callable[[Tensor], Tensor],
            moment_outputs: Optional[Callable[[], Iterable[tuple[Tensor, Tensor]]]] = None) -> None:
        """Two passes over (features, logits) of training images: class statistics, then the
        moments of S0/S1/S2 that z-normalise the integrated score.

        `moment_outputs` (default: `outputs`) gives the second pass other images: the
        reference protocol measures the moments on AUGMENTED training images while its
        prototypes and Gram means come from test-transformed ones, as the reference code.
        """
        if not self.needs_fit:
            return
        self.stats.reset_()
        for features, logits in outputs():
            self.stats.update_class_stats(features.float(), self.classify(logits.float()))
        self.stats.reduce_(reduce, "class")
        for features, logits in (moment_outputs or outputs)():
            raw = compute_scores(self.head_kind, features.float(), logits.float(), self.stats)
            self.stats.update_moments({k: raw[k] for k in self.stats.score_names})
        self.stats.reduce_(reduce, "moments")

    def __call__(self, features: Tensor, logits: Tensor) -> dict[str, Tensor]:
        """{"pred": [B], <every available score>: float64 [B]} for one batch."""
        stats = self.stats if self.needs_fit else None
        return compute_scores(self.head_kind, features.float(), logits.float(), stats)
