"""One line of meaning per config key, for `--help-config` and the README's reference."""

from __future__ import annotations

import dataclasses
import typing

from .config import CHOICES, Config

HELP: dict[str, str] = {
    "run.name": "run folder name under run.output_dir (also the W&B run name)",
    "run.output_dir": "where run folders live",
    "run.method": "cssr: train from scratch; cssr_ft: fine-tune a head on a frozen pretrained backbone",
    "run.seed": "global seed (Python, NumPy, torch, sampler)",
    "run.mixed_precision": "no | fp16 | bf16 (Accelerate autocast)",
    "run.deterministic": "deterministic torch algorithms (tests, exact resume)",
    "run.keep_last": "number of step checkpoints kept",
    "run.checkpoint_every_steps": "also checkpoint every N optimizer steps (0: end of epoch only)",
    "run.max_steps": "stop after N optimizer steps (smoke tests, benchmarks)",
    "run.progress": "progress bars on rank 0",
    "data.dataset": "fashion_mnist, mnist, cifar10, cifar100, svhn, cifar_plus10, cifar_plus50, tinyimagenet, imagenet, imagefolder",
    "data.root": "data root holding the data set in its usual on-disk layout",
    "data.format": "native (files on disk) | shards (WebDataset, see docs/shards.md)",
    "data.split_family": "builtin | cssr (reference splits a-e) | arpl (ARPL/Vaze splits 0-4) | none (all known)",
    "data.split": "split name within the family",
    "data.split_file": "reference-format split file (exps/<ds>/spl_<s>.json); overrides the family",
    "data.known": "explicit known original labels (known class i = known[i])",
    "data.unknown": "explicit unknown original labels (default: every other class)",
    "data.unknown_dataset": "data set the unknowns come from when not data.dataset (CIFAR+N: cifar100)",
    "data.ood": "extra OOD sets [{name, source, root, shards}] reported separately",
    "data.shards.train": "shard index prefix of the training set (data.format=shards)",
    "data.shards.test": "shard index prefix of the test set",
    "data.shards.shuffle_buffer": "samples in the streaming shuffle buffer",
    "data.shards.max_corrupt_fraction": "stop when more than this fraction of samples fail to decode",
    "data.image_size": "network input size (pixels)",
    "data.in_chans": "input channels (1 grey, 3 RGB)",
    "data.mean": "normalisation mean per channel (the backbone's own for fine-tuning)",
    "data.std": "normalisation std per channel",
    "data.train_augment": "cssr (the paper's pool + cutout) | flip_crop | flip_crop_cutout (flip, crop, grey cutout of half the side) | imagenet | none",
    "data.manual_contrast": "multiply normalised images by U(0.1, 2) (cssr recipe)",
    "data.test_resize": "resize shorter side to this before the centre crop at test time",
    "data.val_fraction": "fraction of known training images held out for validation (thresholds, best checkpoint)",
    "data.train_per_class": "cap of training images per known class (subsets)",
    "data.test_per_class": "cap of test images per class",
    "data.stats_per_class": "cap of training images per class used for score statistics",
    "data.batch_size": "training batch per process",
    "data.eval_batch_size": "evaluation batch per process",
    "data.num_workers": "DataLoader workers per process",
    "data.download": "allow torchvision downloads when files are missing",
    "model.backbone": "timm model name (ours: osr_cnn, wrn40_4, wrn28_2, cifar_resnet18, cifar_resnet34)",
    "model.pretrained": "load pretrained weights (timm; from the local HF cache when offline)",
    "model.pretrained_file": "local weights file for the backbone",
    "model.head": "linear | pcssr | rcssr",
    "model.latent_dim": "auto-encoder latent size L",
    "model.gamma": "logit scale (default 0.1 for CSSR, 1.0 linear)",
    "model.distance": "l1 (paper) | l2 (closed form)",
    "model.hidden_layers": "hidden sizes of each class auto-encoder (default none)",
    "model.projection_dim": "1x1 conv + BN + LeakyReLU projection before the heads (fine-tuning)",
    "model.clamp": "logits are clamped to [-clamp, clamp]",
    "model.freeze_backbone": "backbone in eval mode without gradients (cssr_ft)",
    "model.class_chunk": "classes per chunk in the CSSR L1 kernel (default: sized for cache)",
    "model.sync_bn": "SyncBatchNorm across ranks",
    "model.channels_last": "channels-last memory format",
    "model.compile": "torch.compile the model (falls back to eager when unavailable)",
    "optim.name": "sgd | adamw",
    "optim.lr": "base learning rate",
    "optim.scale_lr_by_batch": "lr x global_batch / 128 (fine-tuning recipe)",
    "optim.momentum": "SGD momentum (paper: 0)",
    "optim.nesterov": "Nesterov momentum",
    "optim.weight_decay": "weight decay",
    "optim.grad_clip": "clip gradient norm (off when null)",
    "schedule.kind": "multistep | cosine | constant, set per iteration",
    "schedule.epochs": "training epochs",
    "schedule.warmup_epochs": "linear warm-up length in epochs (fractions allowed)",
    "schedule.milestones": "multistep: epochs where lr is multiplied by schedule.gamma",
    "schedule.gamma": "multistep decay factor",
    "schedule.min_lr": "cosine floor as a fraction of the base lr",
    "eval.test_interval": "full test evaluation every N epochs (0: at the end only)",
    "eval.score": "auto | s0 | s1 | s2 | integrated | msp | mls | energy",
    "eval.baselines": "scores reported beside the primary one",
    "eval.tpr": "TPR (on validation knowns) that sets the macro-F1 threshold",
    "eval.select_best_by": "val_acc | val_loss | last: which checkpoint is 'best' (never test metrics)",
    "tracking.wandb": "log to W&B through Accelerate (offline without an API key)",
    "tracking.project": "W&B project",
    "tracking.entity": "W&B entity",
    "tracking.group": "W&B group (e.g. a sweep)",
    "tracking.tags": "W&B tags",
    "tracking.log_every": "log (and check preemption) every N steps",
}


def _rows(cls: type, prefix: str) -> list[tuple[str, str, str]]:
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += _rows(tp, key)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
        rows.append((key, name.replace("cssr_dist.config.", ""), repr(default)))
    return rows


def reference_table() -> str:
    """Markdown table of every key: type, default, meaning."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default in _rows(Config, ""):
        meaning = HELP.get(key, "")
        if key in CHOICES and not meaning:
            meaning = " | ".join(CHOICES[key])
        cells = [f"`{key}`", tp, f"`{default}`", meaning]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
