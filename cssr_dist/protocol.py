"""Evaluation protocols: which numbers a run reports, and under which rules.

Two protocols (``eval.protocol``), both legitimate, giving different numbers for the same
model (docs/method.md §3-§5):

* ``clean`` (default, for new work): a validation slice of the known training images picks
  the best checkpoint and the macro-F1 threshold; score statistics come from test-transformed
  training images; AUPR is average precision; FPR95 is taken at the first threshold reaching
  TPR 0.95, reported with known and with OOD as the positive class.
* ``reference``: the CSSR paper's protocol, for reproducing its tables: every known
  training image trains, every epoch (no validation slice, the last partial batch kept),
  the LAST epoch is evaluated, the recipe's batch is the GLOBAL batch at any process count
  (`data.reference_global_batch_size` where the config's batch is per process), the lr
  follows the reference code's schedule formula (warm-up from 0), the class statistics of
  S1/S2 come from all training images with test transforms and only the z-normalisation
  moments from the augmented ones, AUPR / FPR95 / OSCR use the reference code's
  definitions, and macro-F1 is not reported (the reference tunes its threshold on the test
  set; without a validation slice there is no honest threshold).

:func:`apply_protocol` runs inside ``config.build_config``, so the config saved in a run
folder already shows the settings the run used; :func:`describe_protocol` and
:func:`batch_plan` give the lines printed at start.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, NamedTuple

from .errors import ConfigError
from .eval.metrics import NOT_REPORTED, protocol_metric_keys

if TYPE_CHECKING:  # annotations only: config.py applies the protocol when it builds a Config
    from .config import Config, OptimConfig

__all__ = ["PROTOCOLS", "REFERENCE_SETTINGS", "apply_protocol", "describe_protocol", "BatchPlan", "base_lr",
           "batch_plan", "metric_keys", "not_reported"]

PROTOCOLS = ("clean", "reference")

#: What ``reference`` forces, as dotted config keys (the global batch is handled apart).
REFERENCE_SETTINGS: dict[str, object] = {
    "data.val_fraction": 0.0,  # the reference trains on every known training image
    "data.drop_last": False,  # ... every epoch (its loader keeps the last partial batch)
    "schedule.formula": "reference",  # ... at its schedule's rates (warm-up from 0, epoch-wise)
    "eval.select_best_by": "last",  # ... and reports the last epoch
    "data.stats_per_class": None,  # ... with score statistics over all training images,
    "eval.stats_transform": "train",  # ... z-norm moments of augmented ones (class statistics: test transforms)
    "eval.recalibrate_bn": False,  # ... and BatchNorm statistics as training left them
}

#: The reference recipe's batch: 128 images on one GPU (docs/method.md §5).
RECIPE_BATCH = 128


def _set(cfg: Config, key: str, value: object) -> None:
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)


def _get(cfg: Config, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def apply_protocol(cfg: Config) -> Config:
    """A copy of ``cfg`` with the protocol's settings in force (``clean``: unchanged).

    ``reference`` overrides :data:`REFERENCE_SETTINGS` whatever the config says, and makes
    the batch global: ``data.reference_global_batch_size`` when the config states the
    reference's batch apart (the ImageNet configs, whose ``data.batch_size`` is per GPU),
    else ``data.global_batch_size``, else ``data.batch_size`` read as the global batch (the
    reference ran on one GPU). Idempotent.
    """
    if cfg.eval.protocol not in PROTOCOLS:
        raise ConfigError(f"eval.protocol = {cfg.eval.protocol!r} is not valid; choose one of {', '.join(PROTOCOLS)}")
    if cfg.eval.protocol == "clean":
        return cfg
    out = copy.deepcopy(cfg)
    for key, value in REFERENCE_SETTINGS.items():
        _set(out, key, value)
    if out.data.reference_global_batch_size is not None:
        out.data.global_batch_size = out.data.reference_global_batch_size
    elif out.data.global_batch_size is None:
        out.data.global_batch_size = out.data.batch_size
    return out


def metric_keys(cfg: Config, side_by_side: bool = False) -> tuple[str, ...]:
    """Summary metric names under the run's protocol (:func:`metrics.protocol_metrics`)."""
    return protocol_metric_keys(cfg.eval.protocol, side_by_side)


def not_reported(cfg: Config) -> dict[str, str]:
    """Metrics the protocol leaves out, with the reason (write into summary / metrics.md)."""
    return dict(NOT_REPORTED[cfg.eval.protocol])


def describe_protocol(cfg: Config) -> str:
    """One line saying which protocol produced the numbers, printed at start and in reports."""
    if cfg.eval.protocol == "reference":
        return ("protocol reference (the paper's): all known training images every epoch (data.val_fraction 0, "
                "last partial batch kept), last epoch evaluated, global batch as the recipe, the reference's lr "
                "formula (warm-up from 0), class statistics from test-transformed and z-norm moments from "
                "training-augmented training images, AUPR = trapezoid area, FPR95 at the ROC point closest to TPR "
                "0.95 (known positive), OSCR closed at CCR 1 (oscr_to_1); macro-F1 "
                + NOT_REPORTED["reference"]["macro_f1"])
    stats = ("score statistics from test-transformed training images" if cfg.eval.stats_transform == "test" else
             "class statistics from test-transformed and z-norm moments from training-augmented training images")
    return (f"protocol clean: {cfg.data.val_fraction:g} of the known training images held out for validation, "
            f"checkpoint chosen by {cfg.eval.select_best_by}, {stats}, "
            "AUPR = average precision, FPR95 at the first threshold reaching TPR "
            "0.95 (known positive and OOD positive), macro-F1 at a threshold set on validation knowns")


def base_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The fine-tuning recipe scales lr linearly with batch (0.4 * batch / 128).

    `global_batch` is the batch summed over ALL processes: the recipe's 128 was one GPU's
    batch, so 16 GPUs x 64 images train at lr 0.4 x 1024 / 128 whatever the split.
    """
    return cfg.lr * global_batch / RECIPE_BATCH if cfg.scale_lr_by_batch else cfg.lr


class BatchPlan(NamedTuple):
    """Batch sizes and learning rate of a run at a given process count."""

    per_process: int
    global_batch: int
    lr: float

    def describe(self, world: int, cfg: Config) -> str:
        scaled = (f"lr {cfg.optim.lr:g} x {self.global_batch}/{RECIPE_BATCH} = {self.lr:g} (optim.scale_lr_by_batch)"
                  if cfg.optim.scale_lr_by_batch else f"lr {self.lr:g} for global batch {self.global_batch} (not scaled)")
        bn = ("" if not trains_batchnorm(cfg) else
              "; BatchNorm over the global batch (model.sync_bn)" if cfg.model.sync_bn or world == 1
              else f"; BatchNorm over {self.per_process} images per process (model.sync_bn=true: the global batch)")
        source = (" (data.reference_global_batch_size: the reference's batch)"
                  if cfg.eval.protocol == "reference" and cfg.data.reference_global_batch_size is not None else "")
        return f"batch: global {self.global_batch}{source} = {world} process(es) x {self.per_process}; {scaled}{bn}"


def trains_batchnorm(cfg: Config) -> bool:
    """Whether any BatchNorm layer trains: not with a frozen backbone (cssr_ft: its BatchNorm stays in
    eval mode) unless model.projection_dim adds the head's projection (conv + BN). The batch line
    says how BatchNorm sees the batch only when this holds, so a fine-tuning run is not told about a
    layer that never updates."""
    return not cfg.model.freeze_backbone or bool(cfg.model.projection_dim)


def batch_plan(cfg: Config, world: int) -> BatchPlan:
    """Per-process batch, global batch and base lr for ``world`` processes.

    With ``data.global_batch_size`` the global batch is fixed and split over processes (the
    recipe holds at any process count); without it ``data.batch_size`` is per process and
    the global batch grows with the process count. lr scales with the global batch only
    under ``optim.scale_lr_by_batch`` (the fine-tuning recipe).
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    global_batch = cfg.data.global_batch_size
    if global_batch is None:
        per_process = cfg.data.batch_size
        global_batch = per_process * world
    else:
        if global_batch % world:
            raise ConfigError(f"data.global_batch_size = {global_batch} does not split over {world} processes; "
                              f"choose a multiple of {world} or launch a divisor of it")
        per_process = global_batch // world
    return BatchPlan(per_process, global_batch, base_lr(cfg.optim, global_batch))
