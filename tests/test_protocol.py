"""Evaluation protocols (clean | reference) and the explicit global batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from cssr_dist.config import load_config
from cssr_dist.errors import ConfigError
from cssr_dist.eval import metrics as M
from cssr_dist.protocol import apply_protocol, batch_plan, describe_protocol, metric_keys, not_reported

REPO = Path(__file__).resolve().parent.parent
PAPER_CONFIGS = sorted(
    p for ds in ("cifar10", "svhn", "tinyimagenet", "cifar_plus10", "cifar_plus50") for p in (REPO / "configs" / ds).glob("*.yaml")
)


def test_clean_is_the_default_and_changes_nothing():
    cfg = load_config(None, ["data.val_fraction=0.2", "eval.select_best_by=val_loss"])
    assert cfg.eval.protocol == "clean" and cfg.eval.stats_transform == "test"
    assert cfg.data.val_fraction == 0.2 and cfg.eval.select_best_by == "val_loss"
    assert cfg.data.global_batch_size is None
    assert apply_protocol(cfg) is cfg
    assert metric_keys(cfg) == M.CLEAN_METRIC_KEYS and not_reported(cfg) == {}
    assert "protocol clean" in describe_protocol(cfg)


def test_reference_forces_the_papers_settings_whatever_the_config_says():
    cfg = load_config(None, ["eval.protocol=reference", "data.val_fraction=0.2", "eval.select_best_by=val_acc",
                             "data.batch_size=96"])
    assert cfg.data.val_fraction == 0.0
    assert cfg.eval.select_best_by == "last"
    assert cfg.eval.stats_transform == "train"
    assert cfg.data.stats_per_class is None  # statistics over every training image, as the reference
    assert cfg.data.drop_last is False and cfg.schedule.formula == "reference"
    assert cfg.data.global_batch_size == 96  # the config's batch is read as the global one
    assert metric_keys(cfg) == M.REFERENCE_METRIC_KEYS and "macro_f1" not in metric_keys(cfg)
    assert "without test data" in not_reported(cfg)["macro_f1"]
    assert "protocol reference" in describe_protocol(cfg) and "macro-F1" in describe_protocol(cfg)
    assert apply_protocol(cfg) == cfg  # idempotent
    explicit = load_config(None, ["eval.protocol=reference", "data.global_batch_size=256"])
    assert explicit.data.global_batch_size == 256


def test_protocol_and_stats_transform_are_validated():
    with pytest.raises(ConfigError, match="eval.protocol"):
        load_config(None, ["eval.protocol=paper"])
    with pytest.raises(ConfigError, match="eval.stats_transform"):
        load_config(None, ["eval.stats_transform=augmented"])
    with pytest.raises(ConfigError, match="global_batch_size"):
        load_config(None, ["data.global_batch_size=0"])


@pytest.mark.parametrize(
    "overrides, world, expected",
    [
        (["data.batch_size=128"], 4, (128, 512, 0.4)),  # legacy: per process, global grows
        (["data.global_batch_size=128"], 4, (32, 128, 0.4)),  # the recipe at any process count
        (["data.global_batch_size=128"], 1, (128, 128, 0.4)),
        (["data.global_batch_size=512", "optim.scale_lr_by_batch=true"], 8, (64, 512, 1.6)),
        (["data.batch_size=64", "optim.scale_lr_by_batch=true", "optim.lr=0.1"], 2, (64, 128, 0.1)),
    ],
)
def test_batch_plan(overrides, world, expected):
    cfg = load_config(None, ["optim.lr=0.4"] + overrides)
    plan = batch_plan(cfg, world)
    assert (plan.per_process, plan.global_batch) == expected[:2]
    assert plan.lr == pytest.approx(expected[2])
    line = plan.describe(world, cfg)
    assert f"global {expected[1]}" in line and f"x {expected[0]}" in line


@pytest.mark.parametrize("overrides, world, bn", [
    ([], 2, "BatchNorm over 16 images per process"),
    (["model.sync_bn=true"], 2, "BatchNorm over the global batch"),
    (["model.freeze_backbone=true"], 2, None),  # cssr_ft: the frozen backbone's BatchNorm never trains
    (["model.freeze_backbone=true", "model.projection_dim=8"], 2, "BatchNorm over 16 images per process"),
])
def test_batch_line_names_batchnorm_only_where_batchnorm_trains(overrides, world, bn):
    cfg = load_config(None, ["data.global_batch_size=32"] + overrides)
    line = batch_plan(cfg, world).describe(world, cfg)
    assert line.startswith("batch: global 32 = 2 process(es) x 16; lr ")
    assert (bn in line) if bn else ("BatchNorm" not in line and not line.endswith(";")), line


def test_batch_plan_rejects_a_global_batch_that_does_not_split():
    cfg = load_config(None, ["data.global_batch_size=130"])
    with pytest.raises(ConfigError, match="does not split over 4 processes"):
        batch_plan(cfg, 4)


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_paper_configs_state_the_global_batch(path):
    cfg = load_config(path)
    assert cfg.data.global_batch_size == 128
    assert not cfg.optim.scale_lr_by_batch and cfg.optim.lr == pytest.approx(0.4)
    assert batch_plan(cfg, 4) == (32, 128, pytest.approx(0.4))
    ref = load_config(path, ["eval.protocol=reference"])
    assert (ref.data.val_fraction, ref.eval.select_best_by, ref.data.global_batch_size) == (0.0, "last", 128)


def test_ds_without_config_picks_the_data_sets_own_config(capsys):
    from cssr_dist.cli import config_from_args, parse

    cfg = config_from_args(parse(["--ds", "exps/cifar10/spl_a.json"]))
    assert "using configs/cifar10/rcssr.yaml" in capsys.readouterr().err
    assert (cfg.data.dataset, cfg.model.backbone, cfg.model.head, cfg.data.image_size) == ("cifar10", "wrn40_4", "rcssr", 32)
    assert cfg.data.split_file == "exps/cifar10/spl_a.json" and cfg.data.global_batch_size == 128
    cfg = config_from_args(parse(["--ds", "exps/tinyimagenet/spl_b.json", "model.head=pcssr"]))
    assert (cfg.data.dataset, cfg.model.backbone, cfg.model.head) == ("tinyimagenet", "cifar_resnet18", "pcssr")
    assert "configs/tinyimagenet/pcssr.yaml" in capsys.readouterr().err
    cfg = config_from_args(parse(["--ds", "exps/svhn/spl_c.json", "--configupdate", "model.head:linear"]))
    assert (cfg.data.dataset, cfg.model.head) == ("svhn", "linear")
    assert "configs/svhn/linear.yaml" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no config .*mystery.*pass --config"):
        config_from_args(parse(["--ds", "exps/mystery/spl_a.json"]))
    # an explicit --config still wins, and no --ds keeps the built-in default
    cfg = config_from_args(parse(["--config", str(REPO / "configs/smoke.yaml"), "--ds", "exps/cifar10/spl_a.json"]))
    assert cfg.data.dataset == "fashion_mnist" and "using" not in capsys.readouterr().err


def test_reference_statistics_class_stats_on_test_transforms_moments_on_augmented(data_cfg):
    """Under reference, prototypes and Gram means come from the training images with TEST
    transforms and only the z-norm moments from the augmented ones (the reference code's two
    passes); clean takes both from test-transformed images."""
    import random

    import numpy as np
    import torch
    from accelerate import Accelerator

    from cssr_dist.config import EvalConfig, ModelConfig
    from cssr_dist.data.readers import build_run_data
    from cssr_dist.eval.evaluator import Evaluator
    from cssr_dist.models.osr_model import build_model
    from cssr_dist.scoring.scores import Scorer

    cfg = data_cfg(train_per_class=6, val_fraction=0.0, eval_batch_size=16)
    data = build_run_data(cfg, seed=0, augmented_statistics=True)
    assert data.train_eval_augmented is not None
    torch.manual_seed(0)
    model = build_model(ModelConfig(), data.meta.num_classes, cfg.in_chans).eval()
    channels = model.feature_channels(cfg.in_chans, cfg.image_size)
    acc = Accelerator(cpu=True)

    def fitted(moment_loader) -> Scorer:
        scorer = Scorer("rcssr", data.meta.num_classes, channels, "integrated")
        outputs = lambda loader: lambda: (tuple(model(x)) for x, _, _ in loader)  # noqa: E731
        with torch.no_grad():
            scorer.fit(outputs(data.train_eval), lambda t: t, outputs(moment_loader))
        return scorer

    def seeded() -> None:
        random.seed(5), np.random.seed(5), torch.manual_seed(5)

    seeded()
    evaluator = Evaluator(acc, Scorer("rcssr", data.meta.num_classes, channels, "integrated"), data, EvalConfig(),
                          lambda z, y: z.sum())
    evaluator.fit(model)
    got = evaluator.scorer.stats
    seeded()
    expected = fitted(data.train_eval_augmented).stats  # the same augmented draws
    clean = fitted(data.train_eval).stats
    for name in ("proto_sum", "proto_count", "gram_sum", "gram_count"):
        torch.testing.assert_close(getattr(got, name), getattr(clean, name), rtol=1e-12, atol=0)
    torch.testing.assert_close(got.moments, expected.moments, rtol=1e-9, atol=0)
    assert not torch.allclose(got.moments, clean.moments)  # the moments do see the augmentation
    assert build_run_data(cfg, seed=0).train_eval_augmented is None  # clean: nothing augmented


IMAGENET_CONFIGS = sorted((REPO / "configs" / "imagenet").glob("*.yaml"))


@pytest.mark.parametrize("path", IMAGENET_CONFIGS, ids=lambda p: p.name)
def test_imagenet_configs_state_the_references_global_batch_and_lr(path):
    """The reference fine-tuned with batch 128 on one GPU at lr learn_rate x 128 / 128 = 0.4;
    under reference that holds at any process count (the config's 64 is per GPU)."""
    ref = load_config(path, ["eval.protocol=reference"])
    for world in (1, 2, 8, 16):
        plan = batch_plan(ref, world)
        assert (plan.global_batch, plan.per_process) == (128, 128 // world)
        assert plan.lr == pytest.approx(0.4)
        line = plan.describe(world, ref)
        assert "global 128 (data.reference_global_batch_size" in line and "= 0.4" in line
    clean = load_config(path)  # clean: 64 per GPU, lr scaled with the global batch, as before
    assert batch_plan(clean, 16) == (64, 1024, pytest.approx(3.2))
