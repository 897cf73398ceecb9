"""Per-sample open-set scores (higher = more likely KNOWN) and a registry to pick them by name.

Inputs are one model output: features x [B, C, H, W] and the per-pixel logit map
z [B, K, H, W]. Heads work per pixel; every score averages over pixels (docs/method.md §3).

* ``s0``: the head score. RCSSR: mean_p z_pred(p). PCSSR: mean_p z_pred(p) / m(p)^2 with
  m(p) = mean_c |x_c(p)| + PCSSR_EPS (the reference divides by zero for an all-zero
  feature vector). Linear head: MSP.
* ``s1``: class-prototype score, mean over channels and pixels of u_pred * x.
* ``s2``: Gram score, sum(G_test * Gmean_pred).
* ``integrated``: sum over ``stats.score_names`` of (s - mean) / (std + 1e-8).
* ``msp``, ``mls``, ``energy``: cheap baselines on any head, always computed (pytorch-ood's
  MaxSoftmax on the pooled posterior, MaxLogit and energy on the pixel-mean logits).
* every other pytorch-ood post-hoc detector (`posthoc.py`: entropy, GEN, Mahalanobis, KNN,
  ViM, ReAct, ...), computed when `eval.baselines` asks for it and fitted in the statistics pass.

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

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from ..distributed import gather_by_id
from ..errors import ConfigError
from ..models.losses import class_log_probs, loss_kind_for_head
from . import posthoc
from .posthoc import PosthocDetectors, Pooled
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
    "resolve_baselines",
    "DEFAULT_BASELINES",
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
    """Maximum (pooled) softmax probability [B]: pytorch-ood's MaxSoftmax on the pooled
    log-probabilities (their softmax is the loss's pooled posterior)."""
    return posthoc.stateless_score("msp", _log_probs(head_kind, logits).double())


def mls(logits: Tensor) -> Tensor:
    """Maximum of the pixel-mean logits [B] (Vaze et al.'s MLS; pytorch-ood's MaxLogit)."""
    return posthoc.stateless_score("mls", _pixel_mean_logits(logits).double())


def energy(logits: Tensor) -> Tensor:
    """Negative free energy at T=1: logsumexp of the pixel-mean logits [B] (higher = known)."""
    return posthoc.stateless_score("energy", _pixel_mean_logits(logits).double())


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
    detectors: Optional[PosthocDetectors] = None
    cache: dict[str, Optional[Tensor]] = field(default_factory=dict)
    _pred: Optional[Tensor] = field(default=None, init=False, repr=False)
    _pooled: Optional[Pooled] = field(default=None, init=False, repr=False)
    _class_ready: Optional[bool] = field(default=None, init=False, repr=False)
    _moments_ready: Optional[bool] = field(default=None, init=False, repr=False)

    @property
    def pred(self) -> Tensor:
        if self._pred is None:
            self._pred = _predicted(self.head_kind, self.logits)
        return self._pred

    @property
    def pooled(self) -> Pooled:
        """The post-hoc detectors' inputs (pooled features, logits, posterior), computed once."""
        if self._pooled is None:
            self._pooled = Pooled(self.features, self.logits, lambda: _log_probs(self.head_kind, self.logits))
        return self._pooled

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


def _posthoc_score(name: str) -> ScoreFn:
    def score(ctx: ScoreContext) -> Optional[Tensor]:
        return None if ctx.detectors is None else ctx.detectors.score(name, ctx.pooled)

    score.__doc__ = f"pytorch-ood's {posthoc.DETECTORS[name].cls} (None unless requested by eval.baselines)."
    return score


for _name in posthoc.DETECTORS:
    if _name not in posthoc.ALWAYS:
        register_score(_name)(_posthoc_score(_name))


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
    detectors: Optional[PosthocDetectors] = None,
) -> dict[str, Tensor]:
    """Scores for one batch: {"pred": int64 [B], <score>: float64 [B], ...}.

    With ``names=None``: every registered score that is available, i.e. always pred, s0,
    msp, mls, energy; s1 (and s2 with ``use_gram``) once ``stats`` has class statistics;
    integrated once it also has moments; the post-hoc detectors that ``detectors`` holds.
    With explicit ``names``, a requested score that is not available raises ConfigError.
    Readiness costs one host sync per call.
    """
    _check_head_kind(head_kind)
    if features.ndim != 4 or logits.ndim != 4 or features.shape[0] != logits.shape[0]:
        raise ValueError(
            f"need features [B,C,H,W] and logits [B,K,H,W], got {tuple(features.shape)} and {tuple(logits.shape)}"
        )
    ctx = ScoreContext(head_kind, features, logits, stats, detectors)
    out: dict[str, Tensor] = {"pred": ctx.pred}
    for name in SCORE_REGISTRY if names is None else names:
        value = ctx.get(name)
        if value is None:
            if names is not None:
                raise ConfigError(
                    f"score {name!r} needs training-set statistics that are not measured yet "
                    "(S1/S2 need class statistics, integrated also needs moments, post-hoc detectors "
                    "their fit); measure them first or choose s0/msp/mls/energy"
                )
            continue
        out[name] = value
    return out


# --------------------------------------------------------------------------- the protocol
STATISTICS_SCORES = ("s1", "s2", "integrated")
#: Today's default `eval.baselines`.
DEFAULT_BASELINES = ("msp", "mls", "energy")


def primary_score(head_kind: str, method: str, requested: str) -> str:
    """'auto': integrated S0+S1+S2 for CSSR from scratch, S0 for fine-tuning, MSP for linear."""
    if requested != "auto":
        get_score_fn(requested)
        if requested in posthoc.DETECTORS and not posthoc.applicable(requested, head_kind):
            raise ConfigError(f"eval.score: {requested!r} does not apply to {head_kind} heads: {posthoc.NOT_FOR_CSSR}")
        return requested
    if head_kind == "linear":
        return "msp"
    return "s0" if method == "cssr_ft" else "integrated"


def resolve_baselines(requested: Iterable[str] | str, head_kind: str) -> list[str]:
    """`eval.baselines` as score names: a list, or "all" (every registered score that applies
    to the head; s0 only for CSSR heads, where it differs from MSP). One line on a bad name."""
    _check_head_kind(head_kind)
    if isinstance(requested, str):
        if requested != "all":
            raise ConfigError(f"eval.baselines: {requested!r} is neither a list of score names nor 'all'; "
                              f"valid names: {', '.join(SCORE_REGISTRY)}")
        return [n for n in SCORE_REGISTRY if (n != "s0" or head_kind != "linear")
                and (n not in posthoc.DETECTORS or posthoc.applicable(n, head_kind))]
    names = list(dict.fromkeys(requested))
    unknown = [n for n in names if n not in SCORE_REGISTRY]
    if unknown:
        raise ConfigError(f"eval.baselines: unknown score(s) {', '.join(map(repr, unknown))}; "
                          f"valid: all, {', '.join(SCORE_REGISTRY)}")
    for name in names:
        if name in posthoc.DETECTORS and not posthoc.applicable(name, head_kind):
            raise ConfigError(f"eval.baselines: {name!r} does not apply to {head_kind} heads: {posthoc.NOT_FOR_CSSR}; "
                              "drop it or use 'all' (which skips it)")
    return names


def _gather_one_process(local: dict) -> dict:
    return gather_by_id(local, 1)


class Scorer:
    """Every score of one model: `fit` on training data once, then score batches.

    Statistics (prototypes, Gram means, z-normalisation moments) are fitted only when the
    primary score needs them; the baselines that need nothing (s0, msp, mls, energy) are
    always there; the post-hoc detectors named in `baselines` (or the primary) are fitted in
    the same first pass over the training outputs. `reduce` sums a tensor over ranks and
    `gather` joins per-sample arrays of all ranks, so the fitted state is the same everywhere
    whatever each rank saw.
    """

    def __init__(self, head_kind: str, num_classes: int, channels: int, primary: str,
                 baselines: Iterable[str] | str = DEFAULT_BASELINES, fit_samples: int = 20000, fit_maps: int = 1000):
        _check_head_kind(head_kind)
        self.head_kind, self.primary = head_kind, primary
        self.baselines = [b for b in resolve_baselines(baselines, head_kind) if b != primary]
        self.needs_fit = primary in STATISTICS_SCORES
        self.stats = ScoreStatistics(num_classes, channels, use_gram=self.needs_fit)
        wanted = [n for n in [primary, *self.baselines] if n in posthoc.DETECTORS]
        self.detectors = PosthocDetectors(wanted, head_kind, num_classes, channels, fit_samples, fit_maps)

    def to(self, device: torch.device) -> "Scorer":
        self.stats.to(device)
        return self

    def classify(self, logits: Tensor) -> Tensor:
        """Closed-set prediction [B] (argmax of the loss's pooled probabilities)."""
        return _predicted(self.head_kind, logits)

    @property
    def fits_detectors(self) -> bool:
        """Whether post-hoc detectors are requested (they are fitted at every evaluation)."""
        return bool(self.detectors.names)

    @torch.no_grad()
    def fit(self, outputs: Callable[[], Iterable[tuple[Tensor, ...]]], reduce: Callable[[Tensor], Tensor],
            moment_outputs: Optional[Callable[[], Iterable[tuple[Tensor, ...]]]] = None,
            gather: Callable[[dict], dict] = _gather_one_process, head: Optional[torch.nn.Module] = None,
            statistics: bool = True) -> None:
        """Passes over (features, logits[, labels, ids]) of training images: class statistics and
        the post-hoc detectors' training sample in the first, the moments of S0/S1/S2 that
        z-normalise the integrated score in the second.

        `moment_outputs` (default: `outputs`) gives the second pass other images: the
        reference protocol measures the moments on AUGMENTED training images while its
        prototypes and Gram means come from test-transformed ones, as the reference code.
        `head` is the model's head (detectors that modify features run it); `statistics=False`
        fits the detectors only (the CSSR statistics were restored from a checkpoint)."""
        statistics = statistics and self.needs_fit
        sample = self.detectors.new_sample() if self.detectors.needs_data else None
        if not statistics and sample is None:
            self.detectors.fit(head, {}, {})
            return
        if statistics:
            self.stats.reset_()
        device = None
        for batch in outputs():
            features, logits = batch[0].float(), batch[1].float()
            device = features.device
            if statistics:
                self.stats.update_class_stats(features, self.classify(logits))
            if sample is not None:
                if len(batch) < 4:
                    raise ValueError("post-hoc detectors need (features, logits, labels, ids) training batches")
                pooled = Pooled(features, logits, lambda: _log_probs(self.head_kind, logits))
                sample.add(pooled, batch[2], batch[3])
        if sample is not None:
            rows, maps = sample.gathered(gather, device or torch.device("cpu"))
            self.detectors.fit(head, rows, maps)
        else:
            self.detectors.fit(head, {}, {})
        if not statistics:
            return
        self.stats.reduce_(reduce, "class")
        for batch in (moment_outputs or outputs)():
            features, logits = batch[0].float(), batch[1].float()
            raw = compute_scores(self.head_kind, features, logits, self.stats)
            self.stats.update_moments({k: raw[k] for k in self.stats.score_names})
        self.stats.reduce_(reduce, "moments")

    def __call__(self, features: Tensor, logits: Tensor) -> dict[str, Tensor]:
        """{"pred": [B], <every available score>: float64 [B]} for one batch."""
        stats = self.stats if self.needs_fit else None
        return compute_scores(self.head_kind, features.float(), logits.float(), stats, detectors=self.detectors)
