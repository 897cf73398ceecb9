"""Checkpoints of frozen-backbone runs (cssr_ft): the trained parts plus the hash of the frozen
pretrained weights they need; resume, best/ and cssr-predict check that hash before loading
anything, and other weights stop in one line naming both."""

from __future__ import annotations

import pytest
import timm
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cssr_dist.apps.predict import main as predict_main, restore_run
from cssr_dist.config import ScheduleConfig, dump_yaml, load_config
from cssr_dist.engine.build import build_model_and_scorer, weights_source
from cssr_dist.engine.checkpoint import (FROZEN_HASH, Checkpointer, TrainerState, frozen_sha256, frozen_state_keys,
                                         list_checkpoints)
from cssr_dist.engine.schedule import build_scheduler
from cssr_dist.errors import ConfigError, DataError

BACKBONE = "osr_cnn"  # the small default CNN (with BatchNorm): a frozen backbone of 1-channel 28 px images


def _weights(path, seed: int):
    """A 'pretrained' backbone file (timm names), seeded: seed 1 and seed 2 are two different downloads."""
    torch.manual_seed(seed)
    save_file({k: v.contiguous() for k, v in timm.create_model(BACKBONE).state_dict().items()}, str(path))
    return path


def _cfg(weights, *overrides):
    return load_config(None, [f"model.backbone={BACKBONE}", f"model.pretrained_file={weights}", "model.freeze_backbone=true",
                              "model.head=rcssr", "model.latent_dim=4", "run.method=cssr_ft", *overrides])


def _saver(root, cfg, seed: int = 0, steps: int = 0):
    """A Checkpointer over a real OSRModel built from `cfg` (its frozen backbone from the file),
    with SGD + momentum and a schedule; `steps` training steps move the head and its momentum."""
    torch.manual_seed(seed)
    model, scorer = build_model_and_scorer(cfg, 3, "cpu", posthoc=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    scheduler = build_scheduler(optimizer, ScheduleConfig(kind="cosine", epochs=2, warmup_epochs=0), 5)
    model.train()
    for _ in range(steps):
        loss = model(torch.randn(4, 1, 28, 28)).logits.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    scorer.stats.proto_sum += 1.0
    return Checkpointer(Accelerator(cpu=True), root, model=model, optimizer=optimizer, scheduler=scheduler,
                        stats=scorer.stats, fingerprint="fp", log=lambda line: None, schedule=(2, 5),
                        frozen_keys=frozen_state_keys(model), weights_source=weights_source(cfg.model))


def _state(saver) -> dict[str, torch.Tensor]:
    return {**{f"m.{k}": v.clone() for k, v in saver.model.state_dict().items()},
            **{f"o.{i}": s["momentum_buffer"].clone() for i, s in enumerate(saver.optimizer.state.values())},
            **{f"s.{k}": v.clone() for k, v in saver.stats.state_dict().items()}}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_keys_are_the_backbone_and_the_hash_covers_their_bytes(tmp_path):
    cfg = _cfg(_weights(tmp_path / "w1.safetensors", 1))
    model, _ = build_model_and_scorer(cfg, 3, "cpu", posthoc=False)
    keys = frozen_state_keys(model)
    state = model.state_dict()
    assert keys == sorted(k for k in state if k.startswith("backbone.")) and any("running_mean" in k for k in keys)
    assert not any(k.startswith("backbone.") for k in frozen_state_keys(model, buffers_change=True)
                   if "running" in k or "num_batches" in k)  # eval.recalibrate_bn: BatchNorm statistics stay stored
    assert frozen_state_keys(build_model_and_scorer(_cfg(tmp_path / "w1.safetensors", "model.freeze_backbone=false"),
                                                    3, "cpu", posthoc=False)[0]) == []
    digest = frozen_sha256(state, keys)
    assert digest == frozen_sha256({k: v.clone() for k, v in state.items()}, list(reversed(keys)))  # values, order fixed
    nudged = dict(state, **{keys[0]: state[keys[0]].clone().flatten().index_add(0, torch.tensor([0]),
                                                                                   torch.tensor([1e-7])).view_as(state[keys[0]])})
    assert frozen_sha256(nudged, keys) != digest  # one value in the last bits changes it
    assert frozen_sha256(dict(state, **{keys[0]: state[keys[0]].double()}), keys) != digest  # so does the dtype


def test_step_checkpoints_and_best_hold_the_trained_parts_and_the_hash_and_restore_exactly(tmp_path):
    weights = _weights(tmp_path / "w1.safetensors", 1)
    cfg = _cfg(weights)
    saver = _saver(tmp_path / "ckpt", cfg, steps=3)
    saver.save(TrainerState(epoch=0, step_in_epoch=3, global_step=3))
    saver.save_best(epoch=1, best_value=0.5, score="s0")
    expected = _state(saver)
    frozen = saver.frozen_keys
    digest = frozen_sha256(saver.model.state_dict(), frozen)

    model_file = list_checkpoints(tmp_path / "ckpt")[0] / "model.safetensors"
    stored = load_file(str(model_file))
    assert stored and not any(k.startswith("backbone.") for k in stored)  # the trained parts only
    assert set(stored) == set(saver.model.state_dict()) - set(frozen)
    with safe_open(str(model_file), framework="pt") as fh:
        meta = fh.metadata()
    assert meta[FROZEN_HASH] == digest and meta["frozen_tensors"] == str(len(frozen))
    assert meta["frozen_source"] == f"model.pretrained_file {weights}"
    best = load_file(str(tmp_path / "ckpt" / "best" / "weights.safetensors"))
    assert not any(k.startswith("model.backbone.") for k in best) and any(k.startswith("model.head.") for k in best)

    fresh = _saver(tmp_path / "ckpt", cfg, seed=5)  # another head init, the same pretrained backbone
    assert not _equal(_state(fresh), expected)
    assert fresh.restore().global_step == 3 and _equal(_state(fresh), expected)
    other = _saver(tmp_path / "ckpt", cfg, seed=6)
    meta = other.load_best()
    assert meta[FROZEN_HASH] == digest and meta["epoch"] == 1
    assert _equal({k: v for k, v in _state(other).items() if k.startswith("m.")},
                  {k: v for k, v in expected.items() if k.startswith("m.")})


def test_resume_on_other_pretrained_weights_stops_in_one_line_and_changes_nothing(tmp_path):
    """Attack: the checkpoint's hash does not match the weights loaded now (another download, an
    edited file): one line naming both hashes and both sources; model, optimizer and statistics
    stay exactly as built (nothing half-applied), and no older checkpoint is tried instead."""
    first = _weights(tmp_path / "w1.safetensors", 1)
    saver = _saver(tmp_path / "ckpt", _cfg(first), steps=3)
    saver.save(TrainerState(epoch=0, step_in_epoch=2, global_step=2))
    saver.save(TrainerState(epoch=0, step_in_epoch=3, global_step=3))
    ours = frozen_sha256(saver.model.state_dict(), saver.frozen_keys)
    second = _weights(tmp_path / "w2.safetensors", 2)
    other = _saver(tmp_path / "ckpt", _cfg(second), seed=5)
    theirs = frozen_sha256(other.model.state_dict(), other.frozen_keys)
    before = _state(other)
    with pytest.raises(ConfigError) as err:
        other.restore()
    line = str(err.value)
    assert "\n" not in line and f"sha256 {ours[:16]}" in line and f"sha256 {theirs[:16]}" in line
    assert f"model.pretrained_file {first}" in line and f"model.pretrained_file {second}" in line
    assert "nothing was loaded" in line and "model.pretrained_file" in line
    assert _equal(_state(other), before) and other.restored_from is None


def test_best_on_other_pretrained_weights_is_refused_before_anything_loads(tmp_path):
    saver = _saver(tmp_path / "ckpt", _cfg(_weights(tmp_path / "w1.safetensors", 1)), steps=2)
    saver.save_best(epoch=1, best_value=0.5, score="s0")
    other = _saver(tmp_path / "ckpt", _cfg(_weights(tmp_path / "w2.safetensors", 2)), seed=5)
    before = _state(other)
    with pytest.raises(DataError, match=r"trained on frozen backbone weights with sha256 [0-9a-f]{16} .*w1.safetensors"
                                        r".*built now has sha256 [0-9a-f]{16} .*w2.safetensors.*nothing was loaded"):
        other.load_best()
    assert _equal(_state(other), before)  # neither the head nor the statistics were loaded


@pytest.mark.parametrize("craft", ["no_hash", "head_missing", "wrong_count"])
def test_a_crafted_checkpoint_without_its_backbone_is_never_applied(tmp_path, craft):
    """A model file that leaves out tensors is a frozen-backbone checkpoint only when exactly the
    backbone is left out AND its hash and count match: anything else is refused, nothing loaded."""
    cfg = _cfg(_weights(tmp_path / "w1.safetensors", 1))
    saver = _saver(tmp_path / "ckpt", cfg, steps=2)
    saver.save(TrainerState(epoch=0, step_in_epoch=2, global_step=2))
    model_file = list_checkpoints(tmp_path / "ckpt")[0] / "model.safetensors"
    tensors = load_file(str(model_file))
    with safe_open(str(model_file), framework="pt") as fh:
        meta = dict(fh.metadata())
    if craft == "no_hash":
        meta = {}
    elif craft == "head_missing":
        tensors.pop(sorted(k for k in tensors if k.startswith("head."))[0])
    else:
        meta["frozen_tensors"] = "1"
    save_file(tensors, str(model_file), metadata=meta)
    other = _saver(tmp_path / "ckpt", cfg, seed=5)
    before = _state(other)
    with pytest.raises(ConfigError) as err:
        other.restore()
    assert "\n" not in str(err.value)
    assert _equal(_state(other), before)


def _run_folder(tmp_path, weights):
    """A trained-run folder as cssr-predict reads it: config.yaml + best/ (no backbone, its hash)."""
    cfg = _cfg(weights, "data.dataset=fashion_mnist")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(cfg))
    saver = _saver(run / "checkpoints", cfg, steps=2)
    saver.save_best(epoch=1, best_value=0.5, score="s0")
    return run, saver


def test_predict_restores_best_with_the_pretrained_weights_and_refuses_others(tmp_path, capsys):
    weights = _weights(tmp_path / "w1.safetensors", 1)
    run, saver = _run_folder(tmp_path, weights)
    restored = restore_run(run, "cpu", threshold=0.5)
    assert _equal(restored.model.state_dict(), saver.model.state_dict())  # backbone from the file, head from best/
    _weights(weights, 2)  # the file the config names now holds other weights
    with pytest.raises(DataError, match=r"sha256 [0-9a-f]{16} .*sha256 [0-9a-f]{16} .*nothing was loaded"):
        restore_run(run, "cpu", threshold=0.5)
    image = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(image)
    assert predict_main(["--run", str(run), str(image), "--threshold", "0.5", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "frozen backbone weights" in err[0], err
