"""Typed experiment configuration: dataclass schema, YAML with `inherit`, dotted overrides.

One schema serves every entry point (train.py, Slurm scripts, tests) so that a typo is
caught before a cluster job starts, with one line naming the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, check_plain_name
from .protocol import apply_protocol


def option(help: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its one-line meaning beside it (read by `config_help`), so the
    documentation cannot drift from the schema."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class OodSetConfig:
    """An extra unknown-only evaluation set, reported separately (e.g. ImageNet vs iNaturalist)."""

    name: str = option("name of the OOD set in reports (default: the source)", "")
    source: str = option("on-disk format of the set (imagefolder, ood folder, a built-in data set)", "imagefolder")
    root: str = option("folder of the set (default: data.root/<name>)", "")
    shards: str | None = option("shard prefix of the set (data.format=shards)", None)
    group: str = option("near | far: the OOD group whose mean the set joins in reports (OpenOOD's grouping)", "far")


@dataclass
class ShardsConfig:
    """WebDataset shard prefixes (a prefix `p` means `p.json` index + the shards it lists)."""

    train: str | None = option('shard index prefix of the training set (data.format=shards)', None)
    test: str | None = option('shard index prefix of the test set', None)
    shuffle_buffer: int = option('samples in the streaming shuffle buffer', 2000)
    max_corrupt_fraction: float = option('stop when more than this fraction of samples fail to decode', 0.01)
    allow_url_schemes: bool = option("let an index's base_url use pipe:/remote URL schemes (pipe: runs a shell command; trusted indexes only)", False)
    decode_on: str = option("cpu (PIL in the loader workers) | device (workers ship JPEG bytes; decode, crop, flip, normalise on the GPU: data/device_augment.py)", "cpu")


@dataclass
class DataConfig:
    dataset: str = option('fashion_mnist, mnist, cifar10, cifar100, svhn, cifar_plus10, cifar_plus50, tinyimagenet, imagenet, imagefolder', "fashion_mnist")
    root: str = option('data root holding the data set in its usual on-disk layout', "data")
    format: str = option('native (files on disk) | shards (WebDataset, see docs/shards.md)', "native")
    split_family: str = option('builtin | cssr (reference splits a-e) | arpl (ARPL/Vaze splits 0-4) | none (all known)', "builtin")
    split: str = option('split name within the family', "default")
    split_file: str | None = option('reference-format split file (exps/<ds>/spl_<s>.json); overrides the family', None)
    known: list[int] | None = option('explicit known original labels (known class i = known[i])', None)
    unknown: list[int] | None = option('explicit unknown original labels (default: every other class)', None)
    unknown_dataset: str | None = option('data set the unknowns come from when not data.dataset (CIFAR+N: cifar100)', None)
    ood: list[OodSetConfig] = option('extra OOD sets [{name, source, root, shards}] reported separately', factory=list)
    shards: ShardsConfig = option("WebDataset shard prefixes and stream settings", factory=ShardsConfig)
    image_size: int | None = option("network input size (pixels); null: the pretrained backbone's (timm), with its test resize", 28)
    in_chans: int = option('input channels (1 grey, 3 RGB)', 1)
    mean: list[float] | None = option("normalisation mean per channel; null: the pretrained backbone's (timm), for train and test", factory=lambda: [0.5])
    std: list[float] | None = option("normalisation std per channel; null: the pretrained backbone's (timm)", factory=lambda: [0.25])
    train_augment: str = option("cssr (the paper's pool + cutout) | flip_crop | flip_crop_cutout (flip, crop, grey cutout of half the side) | imagenet | none", "cssr")
    manual_contrast: bool = option('multiply normalised images by U(0.1, 2) (cssr recipe)', True)
    test_resize: int | None = option('resize shorter side to this before the centre crop at test time', None)
    fit: str = option("how an image of another size reaches data.image_size: resize (shorter side, then centre crop) | pad (a centred zero border around a smaller image, e.g. 28 px Fashion-MNIST in a 32 px network as the reference code ran it; larger images are resized)", "resize")
    val_fraction: float = option('fraction of known training images held out for validation (thresholds, best checkpoint)', 0.1)
    train_per_class: int | None = option('cap of training images per known class (subsets)', None)
    test_per_class: int | None = option('cap of test images per class', None)
    stats_per_class: int | None = option('cap of training images per class used for score statistics', None)
    batch_size: int = option('training batch per process (ignored when data.global_batch_size is set)', 128)
    global_batch_size: int | None = option('training batch summed over all processes: per process = global / processes (the recipe holds at any process count); null: data.batch_size per process', None)
    drop_last: bool = option('drop the last partial training batch of each epoch (data.format native; the reference protocol keeps it: every image trains every epoch)', True)
    reference_global_batch_size: int | None = option('global training batch under eval.protocol=reference, the batch the reference ran (fine-tuning: 128 on one GPU); null: data.global_batch_size, else data.batch_size read as global', None)
    eval_batch_size: int = option('evaluation batch per process', 256)
    num_workers: int = option('DataLoader workers per process', 2)
    download: bool = option('allow torchvision downloads when files are missing', False)


@dataclass
class ModelConfig:
    backbone: str = option('timm model name (ours: osr_cnn, wrn40_4, wrn28_2, cifar_resnet18, cifar_resnet34)', "osr_cnn")
    pretrained: bool = option('load pretrained weights (timm; from the local HF cache when offline)', False)
    pretrained_file: str | None = option('local weights file for the backbone', None)
    head: str = option('linear | pcssr | rcssr', "rcssr")
    latent_dim: int = option('auto-encoder latent size L', 64)
    gamma: float | None = option('logit scale (default 0.1 for CSSR, 1.0 linear)', None)
    gamma_reference_width: int | None = option("CSSR heads: logit scale = gamma x this / C (C = channels the auto-encoders see), so wide backbones keep the 512-channel scale; null: gamma as is", None)
    distance: str = option('l1 (paper) | l2 (closed form)', "l1")
    hidden_layers: list[int] = option('hidden sizes of each class auto-encoder (default none)', factory=list)
    projection_dim: int | None = option('1x1 conv + BN + LeakyReLU projection before the heads (fine-tuning)', None)
    clamp: float = option('logits are clamped to [-clamp, clamp]', 100.0)
    freeze_backbone: bool = option('backbone in eval mode without gradients (cssr_ft)', False)
    class_chunk: int | None = option('classes per chunk in the CSSR L1 kernel (default: sized for cache)', None)
    l1_kernel: str = option('CSSR L1 distance: auto (fused Triton kernel on CUDA, measured 4.7-5.4x faster on an H200; chunked elsewhere) | chunked | triton (fused kernel, CUDA)', "auto")
    sync_bn: bool = option('SyncBatchNorm across ranks', False)
    channels_last: bool = option('channels-last memory format', False)
    compile: bool = option('torch.compile the model (falls back to eager when unavailable)', False)
    compile_mode: str = option('torch.compile mode (with model.compile): auto (reduce-overhead up to 64 px, where steps are launch-bound; default above) | default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs', "auto")


@dataclass
class OptimConfig:
    name: str = option('sgd | adamw', "sgd")
    lr: float = option('base learning rate', 0.4)
    scale_lr_by_batch: bool = option('lr x global_batch / 128 (fine-tuning recipe)', False)
    momentum: float = option('SGD momentum (paper: 0)', 0.0)
    nesterov: bool = option('Nesterov momentum', False)
    weight_decay: float = option('weight decay', 5e-4)
    grad_clip: float | None = option('clip gradient norm (off when null)', None)


@dataclass
class ScheduleConfig:
    kind: str = option('multistep | cosine | constant, set per iteration', "multistep")
    epochs: int = option('training epochs', 200)
    warmup_epochs: float = option('linear warm-up length in epochs (fractions allowed)', 0.0)
    milestones: list[float] = option('multistep: epochs where lr is multiplied by schedule.gamma', factory=lambda: [120.0, 190.0])
    gamma: float = option('multistep decay factor', 0.1)
    min_lr: float = option('cosine floor as a fraction of the base lr', 0.0)
    formula: str = option("project (warm-up (s+1)/W, decay and cosine per step) | reference (the reference code's: warm-up s/W from 0, milestones and cosine per whole epoch; forced by eval.protocol=reference)", "project")


@dataclass
class EvalConfig:
    test_interval: int = option('full test evaluation every N epochs (0: at the end only)', 1)
    score: str = option('auto | s0 | s1 | s2 | integrated | msp | mls | energy', "auto")
    baselines: list[str] | str = option("scores reported beside the primary one: score names (s0 s1 s2 integrated msp mls energy, or pytorch-ood's post-hoc detectors: docs/posthoc.md) or all (every one that applies to the head)", factory=lambda: ["msp", "mls", "energy"])
    posthoc_fit_samples: int = option("cap of training images whose pooled features and logits fit the post-hoc detectors (a fixed id-hashed subsample, gathered on every rank)", 20000)
    posthoc_fit_maps: int = option("cap of training feature maps kept for the post-hoc detectors fitted on feature maps (ReAct, VRA)", 1000)
    posthoc_keep_sample: bool = option("keep the post-hoc detectors' training sample in best/ so --test refits them without a pass over the training images (its size: features and logits of posthoc_fit_samples images plus posthoc_fit_maps feature maps; ~32 MB for the default experiment, ~0.65 GB for ResNet-50 on ImageNet-1k)", True)
    tpr: float = option('TPR (on validation knowns) that sets the macro-F1 threshold', 0.95)
    select_best_by: str = option("val_acc | val_loss | last: which checkpoint is 'best' (never test metrics); a tie goes to the lower val_loss (val_acc) or higher val_acc (val_loss), then the earlier epoch", "val_acc")
    protocol: str = option("clean (validation slice, best-by-validation, clean metric definitions) | reference (the paper's: all training images every epoch, last epoch, its lr formula, reference AUPR/FPR95/OSCR, z-norm moments from augmented images); see cssr_dist/protocol.py", "clean")
    stats_transform: str = option("test | train: transform of the training images behind the z-normalisation moments of the integrated score (reference: train, the strong augmentation); prototypes and Gram means always use test transforms", "test")
    recalibrate_bn: bool = option("recompute BatchNorm running statistics on training images (test transforms) before evaluating", False)
    recalibrate_bn_batches: int | None = option("batches per process for BatchNorm recalibration (null: the whole training set)", None)


@dataclass
class TrackingConfig:
    wandb: bool = option('log to W&B through Accelerate (offline without an API key)', True)
    project: str = option('W&B project', "cssr-dist")
    entity: str | None = option('W&B entity', None)
    group: str | None = option('W&B group (e.g. a sweep)', None)
    tags: list[str] = option('W&B tags', factory=list)
    log_every: int = option('log (and check preemption) every N steps; the steps since the last log are logged at each epoch end too', 50)


@dataclass
class RunConfig:
    name: str = option('run folder name under run.output_dir (also the W&B run name)', "default")
    output_dir: str = option('where run folders live', "runs")
    method: str = option('cssr: train from scratch; cssr_ft: fine-tune a head on a frozen pretrained backbone', "cssr")
    seed: int = option('global seed (Python, NumPy, torch, sampler)', 0)
    mixed_precision: str = option('no | fp16 | bf16 (Accelerate autocast)', "no")
    deterministic: bool = option('deterministic torch algorithms (tests, exact resume)', False)
    keep_last: int = option('number of step checkpoints kept', 2)
    checkpoint_every_steps: int = option('also checkpoint every N optimizer steps (0: end of epoch only)', 0)
    max_steps: int | None = option('stop after N optimizer steps (smoke tests, benchmarks)', None)
    progress: bool = option('progress bars on rank 0', True)
    force_resume: bool = option('resume even when the config differs from the checkpoint (fingerprint): your settings from now on', False)
    force_restart: bool = option('start the run over: its previous files (checkpoints, best/, history, summaries) move to <run>/replaced_<N>/, nothing is deleted', False)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


OOD_GROUPS = ("near", "far")  # data.ood[].group

CHOICES: dict[str, tuple[str, ...]] = {
    "data.format": ("native", "shards"),
    "data.split_family": ("builtin", "cssr", "arpl", "none"),
    "data.train_augment": ("cssr", "flip_crop", "flip_crop_cutout", "imagenet", "none"),
    "data.fit": ("resize", "pad"),
    "model.head": ("linear", "pcssr", "rcssr"),
    "model.distance": ("l1", "l2"),
    "model.l1_kernel": ("auto", "chunked", "triton"),
    "model.compile_mode": ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "data.shards.decode_on": ("cpu", "device"),
    "optim.name": ("sgd", "adamw"),
    "schedule.kind": ("multistep", "cosine", "constant"),
    "schedule.formula": ("project", "reference"),
    "run.method": ("cssr", "cssr_ft"),
    "run.mixed_precision": ("no", "fp16", "bf16"),
    "eval.select_best_by": ("val_acc", "val_loss", "last"),
    "eval.protocol": ("clean", "reference"),
    "eval.stats_transform": ("test", "train"),
}


# ---------------------------------------------------------------- type checking
# A decimal number as users write it: `5e-4`, `1E-3`, `.5`, `-2.`. YAML 1.1 (PyYAML) reads an
# exponent without a dot (`5e-4`) as a string, on the command line and in files alike.
FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check (and minimally convert, e.g. int -> float) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if errors else ConfigError(f"{key}: invalid value {value!r} {where}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r} {where}")
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r} {where}")
        return _build(tp, value, key, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)  # the one place: overrides, --configupdate and YAML files all pass here
    if tp is str and isinstance(value, bool) and key == "run.mixed_precision" and not value:
        return "no"  # YAML 1.1 reads a bare `no` as false
    if tp is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # `split: 0` in YAML names the ARPL split "0"
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"'{key}' must be true or false, got {value!r} {where}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"'{key}' must be an integer, got {value!r} {where}")
    if not isinstance(value, tp):
        raise ConfigError(f"'{key}' must be {_type_name(tp)}, got {value!r} {where}")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}' {where}{hint}")


def _build(cls: type, data: dict, prefix: str, where: str) -> Any:
    hints = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in hints:
            raise _unknown_key(key, list(hints), where)
        kwargs[name] = _coerce(value, hints[name], key, where)
    return cls(**kwargs)


# ---------------------------------------------------------------- YAML + inherit
def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config, resolving `inherit:` (a path or list of paths, relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; pass an existing YAML, e.g. configs/smoke.yaml")
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"config inheritance cycle at {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"invalid YAML in {path}{line}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at top level")
    parents = data.pop("inherit", None) or []
    merged: dict = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = _deep_merge(merged, load_yaml_tree(path.parent / parent, _seen + (resolved,)))
    return _deep_merge(merged, data)


def parse_override(text: str, sep: str = "=") -> tuple[str, Any]:
    """`a.b=value` -> ('a.b', parsed value); values are YAML scalars/lists (`[1,2]`, `null`)."""
    if sep not in text:
        raise ConfigError(f"override '{text}' is not of the form key{sep}value (e.g. schedule.epochs{sep}5)")
    key, raw = text.split(sep, 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_override(tree: dict, key: str, value: Any) -> dict:
    """Set a dotted key inside a nested dict (validated later against the schema)."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
    node[parts[-1]] = value
    return tree


def validate(cfg: Config) -> Config:
    """Cross-field checks that the type system cannot express."""
    for key, choices in CHOICES.items():
        value = cfg
        for name in key.split("."):  # data.shards.decode_on: sections nest
            value = getattr(value, name)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(choices)}"
            raise ConfigError(f"'{key}' = {value!r} is not valid; {hint}")
    if cfg.data.batch_size < 1 or cfg.data.eval_batch_size < 1:
        raise ConfigError("data.batch_size and data.eval_batch_size must be >= 1")
    for key in ("global_batch_size", "reference_global_batch_size"):
        if getattr(cfg.data, key) is not None and getattr(cfg.data, key) < 1:
            raise ConfigError(f"data.{key} must be >= 1 (or null)")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction = {cfg.data.val_fraction} must be in [0, 1)")
    if cfg.schedule.epochs < 1:
        raise ConfigError(f"schedule.epochs = {cfg.schedule.epochs} must be >= 1")
    if cfg.eval.posthoc_fit_samples < 1 or cfg.eval.posthoc_fit_maps < 1:
        raise ConfigError("eval.posthoc_fit_samples and eval.posthoc_fit_maps must be >= 1")
    if isinstance(cfg.eval.baselines, str) and cfg.eval.baselines != "all":
        raise ConfigError(f"eval.baselines = {cfg.eval.baselines!r}: give a list of score names or 'all'")
    if cfg.eval.test_interval < 0:
        raise ConfigError("eval.test_interval must be >= 0 (0 = evaluate at the end only)")
    if (cfg.data.mean is None) != (cfg.data.std is None):
        raise ConfigError("data.mean and data.std must both be set or both be null (null: the backbone's own)")
    check_plain_name(cfg.run.name, "run.name")  # it becomes <run.output_dir>/<name>/
    for i, entry in enumerate(cfg.data.ood):
        check_plain_name(entry.name or entry.source, f"data.ood[{i}].name")  # reports and <data.root>/<name>
        if entry.group not in OOD_GROUPS:
            raise ConfigError(f"data.ood[{i}].group = {entry.group!r} is not valid; choose one of {', '.join(OOD_GROUPS)}")
    if cfg.model.gamma_reference_width is not None and cfg.model.gamma_reference_width < 1:
        raise ConfigError("model.gamma_reference_width must be a positive channel count (e.g. 512) or null")
    if cfg.data.mean is not None and len(cfg.data.mean) != len(cfg.data.std):
        raise ConfigError("data.mean and data.std must have the same length")
    return cfg


def build_config(tree: dict, where: str = "") -> Config:
    """Schema-checked config with its evaluation protocol applied (eval.protocol), so the
    saved config.yaml shows the settings the run really used. Null data.mean/std/image_size
    ("the backbone's own") stay null here: the engine resolves them from timm's tables as a
    step of its own (`models.backbones.resolve_backbone_data_config`), so this schema needs
    no model registry."""
    return validate(apply_protocol(validate(_build(Config, tree, "", where))))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Config from an optional YAML file plus `key=value` overrides, validated."""
    tree = load_yaml_tree(path) if path else {}
    for text in overrides:
        key, value = parse_override(text)
        apply_override(tree, key, value)
    where = f"(in {path} or overrides)" if path else "(in overrides)"
    return build_config(tree, where)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


#: data.ood[] fields that the other data.format never reads
OOD_FIELDS_UNUSED = {"shards": ("source", "root"), "native": ("shards",)}


def shown_dict(cfg: Config) -> dict:
    """The config as users see it (--print-config, the run's config.yaml, the W&B config): a
    data.ood entry leaves out the fields its data.format does not read (a shard set has no source
    or root) while they hold their defaults, so what is shown is what the run uses."""
    tree = to_dict(cfg)
    unused, defaults = OOD_FIELDS_UNUSED.get(cfg.data.format, ()), dataclasses.asdict(OodSetConfig())
    tree["data"]["ood"] = [{k: v for k, v in entry.items() if not (k in unused and v == defaults[k])}
                           for entry in tree["data"]["ood"]]
    return tree


def dump_yaml(cfg: Config) -> str:
    """The config as YAML (`shown_dict`); loading the text back gives the same config."""
    return yaml.safe_dump(shown_dict(cfg), sort_keys=False)
