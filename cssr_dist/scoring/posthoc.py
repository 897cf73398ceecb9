"""pytorch-ood's post-hoc OOD detectors on this project's model outputs (docs/posthoc.md).

Every detector here is pytorch-ood's own class, called through its representation API
(`fit_logits` / `predict_logits`, `fit_features` / `predict_features`, `fit_feature_maps` /
`predict_feature_maps`) on the outputs the evaluation pass has already computed: no detector
is written here, none runs the model again. What each kind of detector receives:

* ``logits``: the pixel-mean logits [B, K] (MaxLogit, energy, OpenMax);
* ``posterior``: the model's pooled class log-probabilities [B, K], pooled exactly as its
  loss pools them (`models/losses.py`); their softmax IS the model's posterior, so
  posterior-based detectors (MSP, entropy, GEN, KL matching) score the classifier that was
  trained (for the linear head these are the log-softmax of the pixel-mean logits);
* ``features``: the pixel-mean of the feature map the head scores [B, C];
* ``maps``: that feature map [B, C, H, W] and the head itself (applied after the map is
  modified, then pixel-mean pooled) for ReAct, ASH, SCALE, RankFeat, VRA.

Detectors that need the last layer as a linear map on pooled features (DICE, ViM, fDBD, NCI,
LTS, SHE, NNGuide, pNML) get the linear head's 1x1 conv as an ``nn.Linear`` (times its gamma,
no bias): pooling commutes with it, so it reproduces the model's pooled logits exactly. The
CSSR heads have no such layer (class scores are reconstruction errors of per-class
auto-encoders at every pixel, and pooling does not commute with them), so those detectors do
not apply to CSSR heads (`applicable`).

pytorch-ood returns OUTLIER scores; this module negates them (higher = more likely known).

Fitting: one bounded sample of training outputs (`TrainingSample`), collected in the same
statistics pass as the CSSR statistics and gathered on every rank, so every rank fits the
same detectors. The sample keeps the rows with the smallest key frac(id * golden ratio): a
fixed subsample of at most `cap` images, the same for any number of processes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from pytorch_ood import detector as pood
from pytorch_ood.api import Detector
from torch import Tensor, nn

from ..errors import DataError

__all__ = ["DETECTORS", "NOT_WRAPPED", "Spec", "Parts", "TrainingSample", "PosthocDetectors", "applicable",
           "linear_view", "head_logits_fn", "outlier_to_known", "sample_from_tensors"]

INPUTS = ("logits", "posterior", "features", "maps")
_FIT = {"logits": "fit_logits", "posterior": "fit_logits", "features": "fit_features", "maps": "fit_feature_maps"}
_PREDICT = {"logits": "predict_logits", "posterior": "predict_logits", "features": "predict_features",
            "maps": "predict_feature_maps"}
#: frac(id * this) orders training images for the bounded sample (equidistributed over any id range).
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass
class Parts:
    """What a pytorch-ood detector is built from.

    In the evaluation pass `model`, `encoder` and `backbone` are None: scores come from outputs
    already computed. Tests pass callables on images instead, so that pytorch-ood's own
    `fit(loader)` / `predict(images)` run the same detector end to end.
    """

    num_classes: int
    channels: int
    model: Optional[Callable[[Tensor], Tensor]] = None  # images -> logits / log-probabilities [B, K]
    encoder: Optional[Callable[[Tensor], Tensor]] = None  # images -> pooled features [B, C]
    backbone: Optional[Callable[[Tensor], Tensor]] = None  # images -> feature map [B, C, H, W]
    head: Optional[Callable[[Tensor], Tensor]] = None  # feature map -> pixel-mean logits [B, K]
    linear: Optional[nn.Linear] = None  # the last layer on pooled features (linear head only)


@dataclass(frozen=True)
class Spec:
    """One wrapped detector: its registry name, pytorch-ood class, input kind and constructor."""

    name: str
    cls: str
    input: str
    build: Callable[[Parts], Detector]
    linear: bool = False  # needs the last layer as a linear map on pooled features
    fit_on_cpu: bool = False  # pytorch-ood fits it with scikit-learn / numpy from the tensor as given

    @property
    def needs_fit(self) -> bool:
        return bool(getattr(pood, self.cls).requires_fit)


def _specs(*specs: Spec) -> dict[str, Spec]:
    return {s.name: s for s in specs}


#: name -> Spec; the first three are always computed (today's baselines), the rest on request.
DETECTORS: dict[str, Spec] = _specs(
    Spec("msp", "MaxSoftmax", "posterior", lambda p: pood.MaxSoftmax(p.model)),
    Spec("mls", "MaxLogit", "logits", lambda p: pood.MaxLogit(p.model)),
    Spec("energy", "EnergyBased", "logits", lambda p: pood.EnergyBased(p.model)),
    Spec("entropy", "Entropy", "posterior", lambda p: pood.Entropy(p.model)),
    Spec("gen", "GEN", "posterior", lambda p: pood.GEN(p.model)),
    Spec("klm", "KLMatching", "posterior", lambda p: pood.KLMatching(p.model)),
    Spec("openmax", "OpenMax", "logits", lambda p: pood.OpenMax(p.model, alpha=min(10, p.num_classes))),
    Spec("mahalanobis", "Mahalanobis", "features", lambda p: pood.Mahalanobis(p.encoder)),
    Spec("rmd", "RMD", "features", lambda p: pood.RMD(p.encoder)),
    Spec("gmm", "GMM", "features", lambda p: pood.GMM(p.encoder)),
    Spec("knn", "KNN", "features", lambda p: pood.KNN(p.encoder, k=50), fit_on_cpu=True),
    Spec("vim", "ViM", "features", lambda p: pood.ViM(p.encoder, d=max(1, p.channels // 2), w=p.linear.weight,
                                                       b=p.linear.bias), linear=True),
    Spec("dice", "DICE", "features", lambda p: pood.DICE(p.encoder, w=p.linear.weight, b=p.linear.bias, p=0.9),
         linear=True),
    Spec("fdbd", "fDBD", "features", lambda p: pood.fDBD(p.encoder, p.linear), linear=True),
    Spec("nci", "NCI", "features", lambda p: pood.NCI(p.encoder, p.linear), linear=True),
    Spec("lts", "LTS", "features", lambda p: pood.LTS(p.encoder, p.linear), linear=True),
    Spec("she", "SHE", "features", lambda p: pood.SHE(p.encoder, p.linear), linear=True),
    Spec("nnguide", "NNGuide", "features", lambda p: pood.NNGuide(p.encoder, p.linear), linear=True),
    Spec("pnml", "PNML", "features", lambda p: pood.PNML(p.encoder, p.linear), linear=True),
    Spec("react", "ReAct", "maps", lambda p: pood.ReAct(p.backbone, p.head)),
    Spec("ash", "ASH", "maps", lambda p: pood.ASH(p.backbone, p.head)),
    Spec("scale", "SCALE", "maps", lambda p: pood.SCALE(p.backbone, p.head)),
    Spec("rankfeat", "RankFeat", "maps", lambda p: pood.RankFeat(p.backbone, p.head)),
    Spec("vra", "VRA", "maps", lambda p: pood.VRA(p.backbone, p.head)),
)
#: The detectors computed for every run, whatever `eval.baselines` says (they need nothing).
ALWAYS = ("msp", "mls", "energy")

#: pytorch-ood detectors deliberately not wrapped, and why (docs/posthoc.md repeats this).
NOT_WRAPPED = {
    "ODIN, GradNorm, GradUncertainty, MahalanobisODIN, NACUE": "need gradients (input or parameter space) "
    "in the evaluation pass",
    "MCD": "needs several stochastic forward passes with dropout (model inputs, not outputs)",
    "Gram, MultiMahalanobis": "need the activations of several layers (the project's own S2 is a Gram score "
    "on the last feature map)",
    "MCM": "needs CLIP text embeddings of the class names (vision-language models only)",
    "WeightedEBO": "needs class weights learned by VOS training",
    "TemperatureScaling": "fits a temperature by optimisation on held-out labelled data (calibration, not "
    "a detector; on training images it learns nothing useful)",
}
NOT_FOR_CSSR = ("the CSSR heads have no linear last layer (per-pixel class auto-encoders; pooling does not "
                "commute with them), and this detector multiplies pooled features by that layer")


def applicable(name: str, head_kind: str) -> bool:
    """Whether detector `name` applies to a model with this head kind."""
    return not DETECTORS[name].linear or head_kind == "linear"


def outlier_to_known(outlier: Tensor) -> Tensor:
    """pytorch-ood's outlier score -> this project's convention (higher = known), float64."""
    return -outlier.double()


# ---------------------------------------------------------------- views of the model's head
def linear_view(head: nn.Module) -> nn.Linear:
    """The linear head's 1x1 conv (times gamma) as nn.Linear(C, K) on pooled features, bias 0."""
    conv = head.classifier
    k, c = conv.weight.shape[:2]
    layer = nn.Linear(c, k, bias=True).to(conv.weight.device)
    with torch.no_grad():
        layer.weight.copy_(conv.weight.detach().reshape(k, c) * float(head.gamma))
        layer.bias.zero_()
    return layer.requires_grad_(False)


#: Rows of a feature map the head scores at a time for the feature-map detectors: every row is
#: independent, and on the CPU a CSSR head on 512 maps of 128 x 7 x 7 spends a third more time
#: than on 16 slices of 32 (its per-class intermediates [K, C, rows x H x W] leave the cache).
#: Accelerators take the whole batch (slices would only add launches).
HEAD_ROWS_CPU = 32


def head_logits_fn(head: nn.Module, rows: int = HEAD_ROWS_CPU) -> Callable[[Tensor], Tensor]:
    """feature map (already projected) -> the head's pixel-mean logits [B, K] (on the CPU `rows`
    maps at a time)."""

    def logits(maps: Tensor) -> Tensor:
        size = rows if maps.device.type == "cpu" else max(1, len(maps))
        return torch.cat([head.logits_from_features(part).float().mean(dim=(2, 3)) for part in maps.split(size)])

    return logits


# ---------------------------------------------------------------- feature-map detectors on the CPU
@contextlib.contextmanager
def _one_intraop_thread():
    """torch's intra-op threads set to 1 for the block (and restored): the row slices below are
    the parallelism, and an op that spreads itself over the same cores inside each slice only
    contends (the batched SVD of 512 maps ran 14x slower with two threads on a loaded 2-core VM)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """One pool per thread count, kept for the process (its threads idle between batches)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="posthoc-rows")


def rows_in_parallel(predict: Callable[[Tensor], Tensor], maps: Tensor, rows: int = HEAD_ROWS_CPU) -> Tensor:
    """`predict(maps)` on the CPU as one slice of rows per intra-op thread, run at once.

    Why: a feature-map detector modifies each row's map (RankFeat's per-map SVD, ASH/SCALE's
    top-k, ReAct's clip) and runs the head on it; every row is independent. Inside one call,
    LAPACK's batched SVD and the head's small GEMMs use one core or contend for both, so on the
    CPU the detector ran at the speed of one core; slices in threads (torch releases the GIL in
    its ops) use every core. Slices start at multiples of `rows`, the head's own slicing, so the
    scores are the ones of one call on the whole batch."""
    workers = torch.get_num_threads()
    per = -(-len(maps) // max(1, workers))
    per = -(-per // rows) * rows
    if maps.device.type != "cpu" or workers < 2 or per >= len(maps):
        return predict(maps)

    def scored(part: Tensor) -> Tensor:
        with torch.no_grad():  # grad mode is per thread: the caller's no_grad does not reach the pool
            return predict(part)

    with _one_intraop_thread():
        return torch.cat(list(_pool(workers).map(scored, maps.split(per))))


# ---------------------------------------------------------------- the bounded training sample
def sample_keys(ids: Tensor) -> Tensor:
    """frac(id * golden ratio) in float64: the order in which training images enter the sample."""
    return torch.frac(ids.double() * _GOLDEN)


class _Smallest:
    """The `cap` rows with the smallest keys seen so far (on the rows' device, no host sync)."""

    def __init__(self, cap: int):
        self.cap, self.rows = cap, None

    def add(self, rows: dict[str, Tensor]) -> None:
        if self.cap <= 0:
            return
        if self.rows is not None:
            rows = {k: torch.cat([self.rows[k], v]) for k, v in rows.items()}
        if rows["key"].numel() > self.cap:
            keep = torch.topk(rows["key"], self.cap, largest=False).indices
            rows = {k: v[keep] for k, v in rows.items()}
        self.rows = rows

    def gathered(self, gather: Callable[[dict], dict], device: torch.device) -> dict[str, Tensor]:
        """Every rank's rows, cut to the `cap` smallest keys overall, sorted by id, as tensors.

        Keys travel first (small), then only the rows that survive the global cut: the
        transfer is at most `cap` rows, whatever the number of ranks.
        """
        local = {k: v.cpu().numpy() for k, v in (self.rows or {}).items()}
        keys = gather({"ids": local["ids"], "key": local["key"]} if local else {})
        if not keys:
            return {}
        order = np.sort(keys["key"])
        threshold = order[min(self.cap, len(order)) - 1]
        mine = {k: v[local["key"] <= threshold] for k, v in local.items()} if local else {}
        rows = gather(mine)
        return {k: torch.from_numpy(v).to(device) for k, v in rows.items()}


class TrainingSample:
    """Pooled outputs of at most `cap` training images (and feature maps of at most `cap_maps`)."""

    def __init__(self, cap: int, cap_maps: int = 0):
        self.rows, self.maps = _Smallest(cap), _Smallest(cap_maps)

    def add(self, pooled: "Pooled", labels: Tensor, ids: Tensor) -> None:
        key = sample_keys(ids)
        self.rows.add({"key": key, "ids": ids, "labels": labels, "features": pooled.features,
                       "logits": pooled.logits, "posterior": pooled.posterior})
        if self.maps.cap:
            self.maps.add({"key": key, "ids": ids, "labels": labels, "maps": pooled.maps})

    def gathered(self, gather: Callable[[dict], dict], device: torch.device) -> tuple[dict, dict]:
        return self.rows.gathered(gather, device), self.maps.gathered(gather, device) if self.maps.cap else {}


# ---------------------------------------------------------------- one batch's inputs
class Pooled:
    """The detectors' inputs for one batch, each computed once."""

    def __init__(self, features: Tensor, logits: Tensor, log_probs: Callable[[], Tensor]):
        self.maps = features
        self._logits_map, self._log_probs, self._cache = logits, log_probs, {}

    def _get(self, key: str, make: Callable[[], Tensor]) -> Tensor:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def features(self) -> Tensor:
        return self._get("features", lambda: self.maps.float().mean(dim=(2, 3)))

    @property
    def logits(self) -> Tensor:
        return self._get("logits", lambda: self._logits_map.float().mean(dim=(2, 3)))

    @property
    def posterior(self) -> Tensor:
        return self._get("posterior", self._log_probs)

    def of(self, kind: str) -> Tensor:
        return self.maps if kind == "maps" else getattr(self, kind)


# ---------------------------------------------------------------- the fitted detectors of a run
class PosthocDetectors:
    """The requested pytorch-ood detectors of one model: built and fitted once per evaluation
    (the head's weights change during training), then asked for one score per batch."""

    def __init__(self, names: list[str], head_kind: str, num_classes: int, channels: int,
                 cap: int = 20000, cap_maps: int = 1000):
        self.names = [n for n in names if n not in ALWAYS]
        self.head_kind, self.num_classes, self.channels = head_kind, num_classes, channels
        self.cap, self.cap_maps = cap, cap_maps
        self.detectors: dict[str, Detector] = {}
        self.not_fitted: dict[str, str] = {}  # name -> why its fit failed in the last evaluation
        self.sample: Optional[tuple[dict, dict]] = None  # (rows, maps) of the last fit, if it had data
        self.restored: Optional[tuple[dict, dict]] = None  # a stored sample (best/) for the next fit

    @property
    def needs_data(self) -> bool:
        """Whether fitting needs a pass over training images (else binding the head suffices)."""
        return any(DETECTORS[n].needs_fit for n in self.names)

    @property
    def needs_maps(self) -> bool:
        return any(DETECTORS[n].needs_fit and DETECTORS[n].input == "maps" for n in self.names)

    def new_sample(self) -> TrainingSample:
        return TrainingSample(self.cap, self.cap_maps if self.needs_maps else 0)

    def parts(self, head: Optional[nn.Module]) -> Parts:
        linear = linear_view(head) if head is not None and self.head_kind == "linear" else None
        return Parts(self.num_classes, self.channels, head=head_logits_fn(head) if head is not None else None,
                     linear=linear)

    def fit(self, head: Optional[nn.Module], rows: dict[str, Tensor], maps: dict[str, Tensor]) -> None:
        """Build every detector on the current head and fit those that need fitting; their
        state then moves to the head's device (pytorch-ood keeps some on the CPU), so that
        scores come back on the device of the outputs."""
        parts = self.parts(head)
        device = next(head.parameters()).device if head is not None else torch.device("cpu")
        self.detectors, self.not_fitted = {}, {}
        self.sample = (rows, maps) if rows else None
        for name in self.names:
            spec = DETECTORS[name]
            det = spec.build(parts)
            if spec.needs_fit:
                data = maps if spec.input == "maps" else rows
                x, y = data[spec.input], data["labels"]
                if spec.fit_on_cpu:
                    x, y = x.cpu(), y.cpu()
                try:
                    getattr(det, _FIT[spec.input])(x, y)
                except (ValueError, RuntimeError, AssertionError) as err:
                    # e.g. GMM on fewer images per class than feature channels, KNN with k >
                    # the sample: one line and a missing row, never the run (same on every rank)
                    self.not_fitted[name] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
                    warnings.warn(f"post-hoc detector {name} not fitted ({self.not_fitted[name]}); "
                                  "it is left out of this evaluation", stacklevel=2)
                    continue
            self.detectors[name] = det.to(device)

    # -------------------------------------------------------- the sample kept in best/
    def sample_tensors(self) -> dict[str, Tensor]:
        """The sample of the last fit as flat CPU tensors (`rows.<field>`, `maps.<field>`, `cap`,
        `cap_maps`) for best/, so that `--test` refits without a pass over the training images;
        empty when the last fit had no data."""
        if self.sample is None:
            return {}
        rows, maps = self.sample
        out = {f"rows.{k}": v.detach().cpu() for k, v in rows.items()}
        out.update({f"maps.{k}": v.detach().cpu() for k, v in maps.items()})
        out["cap"] = torch.tensor(self.cap, dtype=torch.int64)
        out["cap_maps"] = torch.tensor(self.cap_maps if maps else 0, dtype=torch.int64)
        return out

    def restore_sample(self, tensors: dict[str, Tensor], where: str) -> bool:
        """Keep a stored sample (checked: `sample_from_tensors`) for the next `refit_restored`
        when it is the sample a pass would collect now (same caps, maps when needed)."""
        if not tensors or not self.needs_data:
            return False
        rows, maps, cap, cap_maps = sample_from_tensors(tensors, self.num_classes, self.channels, where)
        if cap != self.cap or (self.needs_maps and cap_maps != self.cap_maps):
            return False
        self.restored = rows, (maps if self.needs_maps else {})
        return True

    def refit_restored(self, head: Optional[nn.Module]) -> bool:
        """Fit on the restored sample (on the head's device) instead of a training pass."""
        if self.restored is None:
            return False
        device = next(head.parameters()).device if head is not None else torch.device("cpu")
        rows, maps = ({k: v.to(device) for k, v in part.items()} for part in self.restored)
        self.fit(head, rows, maps)
        return True

    @torch.no_grad()
    def score(self, name: str, pooled: Pooled) -> Optional[Tensor]:
        """Score [B] of detector `name` (float64, higher = known), None if not requested/fitted."""
        det = self.detectors.get(name)
        if det is None:
            return None
        spec = DETECTORS[name]
        inputs = pooled.of(spec.input)
        if isinstance(det, pood.OpenMax):
            _tabulate_openmax(det, inputs)
        predict = getattr(det, _PREDICT[spec.input])
        if spec.input == "maps":
            return outlier_to_known(rows_in_parallel(predict, inputs))
        return outlier_to_known(predict(inputs))


# ---------------------------------------------------------------- a stored sample, checked
_ROW_FLOATS, _MAP_FLOATS = ("features", "logits", "posterior"), ("maps",)
_INDEX_FIELDS = ("key", "ids", "labels")
#: what to do about a damaged stored sample (train.py on a finished run redoes its final evaluation)
_REDO = "run train.py on the run again: its final evaluation rewrites best/ with a fresh sample"


def sample_from_tensors(tensors: dict[str, Tensor], num_classes: int, channels: int,
                        where: str) -> tuple[dict, dict, int, int]:
    """(rows, maps, cap, cap_maps) of a stored sample (`PosthocDetectors.sample_tensors`), every
    name, shape, dtype and value checked first: one line (DataError) naming `where` when it is
    damaged or another model's. The keys must be frac(id x golden ratio) of the stored ids and
    every label a known class, so a sample edited by hand is refused rather than fitted."""
    expected = {f"rows.{k}" for k in (*_INDEX_FIELDS, *_ROW_FLOATS)} | {"cap", "cap_maps"}
    has_maps = any(k.startswith("maps.") for k in tensors)
    if has_maps:
        expected |= {f"maps.{k}" for k in (*_INDEX_FIELDS, *_MAP_FLOATS)}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise DataError(f"{where}: the post-hoc sample has unexpected {extra[:3]} / missing {missing[:3]} tensors; "
                        f"{_REDO}")
    for cap in ("cap", "cap_maps"):
        if tensors[cap].dim() != 0 or tensors[cap].is_floating_point():
            raise DataError(f"{where}: post-hoc sample {cap} is not an integer; {_REDO}")
    rows = {k[5:]: v for k, v in tensors.items() if k.startswith("rows.")}
    maps = {k[5:]: v for k, v in tensors.items() if k.startswith("maps.")}
    shapes = {"features": (channels,), "logits": (num_classes,), "posterior": (num_classes,), "maps": (channels,)}
    for part_name, part in (("rows", rows), ("maps", maps)):
        if not part:
            continue
        n = part["ids"].shape[0] if part["ids"].dim() == 1 else -1
        for field, value in part.items():
            what = f"{where}: post-hoc sample {part_name}.{field}"
            if field in _INDEX_FIELDS:
                good = value.dim() == 1 and value.shape[0] == n and (value.dtype == torch.float64) == (field == "key") \
                    and (field == "key" or not value.is_floating_point())
            else:
                size = shapes[field]
                good = value.dtype == torch.float32 and value.dim() >= 2 and value.shape[0] == n \
                    and tuple(value.shape[1:1 + len(size)]) == size and value.dim() == (4 if field == "maps" else 2)
            if not good or (value.is_floating_point() and not bool(torch.isfinite(value).all())):
                raise DataError(f"{what} has shape {tuple(value.shape)} / {value.dtype} or non-finite values, not "
                                f"this model's ({num_classes} classes, {channels} channels); {_REDO}")
        labels = part["labels"]
        if n < 1 or not torch.equal(part["key"], sample_keys(part["ids"])) or \
                bool(((labels < 0) | (labels >= num_classes)).any()):
            raise DataError(f"{where}: post-hoc sample {part_name} is inconsistent (keys do not match the ids, or a "
                            f"label is not a known class); {_REDO}")
    return rows, maps, int(tensors["cap"]), int(tensors["cap_maps"])


# ---------------------------------------------------------------- OpenMax: one scipy call per class
class _TabulatedWeibull:
    """One class's fitted Weibull model (pytorch-ood's `LibNotMR`), whose `w_score` of every
    distance of the batch is computed beforehand, vectorised, by that same `LibNotMR.w_score`.

    Why: pytorch-ood's `OpenMax.predict` loops over samples and asks for one scalar `w_score`
    per sample and top class; each is a scipy `exponweib.cdf` call (~80 us of argument
    checking), 90 % of OpenMax's time. The loop then finds the batch's values in the table
    (keyed by the exact float64 distance it computes, and 0.0: see `tabulate`), so its result
    is unchanged; a distance not in the table is computed as before.
    """

    def __init__(self, weibull):
        self.weibull, self.table = weibull, {}

    def tabulate(self, distances: np.ndarray) -> None:
        # 0.0 too: `predict` computes distances only to the classes that are some row's argmax and
        # leaves the others' at 0, yet asks the w_score of every top class (one scipy call a row)
        distances = np.append(distances, 0.0)
        self.table = dict(zip(distances.tolist(), np.asarray(self.weibull.w_score(distances)).tolist()))

    def w_score(self, distance):
        found = self.table.get(float(distance))
        return self.weibull.w_score(distance) if found is None else found


def _tabulate_openmax(det: "pood.OpenMax", logits: Tensor) -> None:
    """Before `det.predict_logits(logits)`: every fitted class's w_scores of this batch, from the
    distances pytorch-ood's own `_get_dists_to_center` gives (the ones its predict computes)."""
    model = det._openmax
    x = logits.detach().cpu().numpy()
    for clazz, weibull in list(model.distributions.items()):
        if not isinstance(weibull, _TabulatedWeibull):
            weibull = model.distributions[clazz] = _TabulatedWeibull(weibull)
        weibull.tabulate(np.asarray(model._get_dists_to_center(clazz, x), dtype=np.float64))


def stateless_score(name: str, inputs: Tensor) -> Tensor:
    """The always-computed detectors (no fit, no head): pytorch-ood's static score, negated."""
    return outlier_to_known(getattr(pood, DETECTORS[name].cls).score(inputs))
