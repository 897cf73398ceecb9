"""Checkpoints as faults and attacks see them: crafted pickles, damaged files, kills mid-write.

Every test builds real checkpoints with `Checkpointer` (model with BatchNorm, SGD with
momentum, the project's LambdaLR schedule, score statistics, RNG states) and then does to
the run folder what shared storage, a preemption or an attacker would.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator

from cssr_dist.config import ScheduleConfig
from cssr_dist.engine.checkpoint import Checkpointer, TrainerState, list_checkpoints
from cssr_dist.engine.schedule import build_scheduler
from cssr_dist.errors import ConfigError, DataError
from cssr_dist.scoring.statistics import ScoreStatistics
from tests.helpers import ROOT, free_port


def parts(width: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.BatchNorm1d(width), torch.nn.Linear(width, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    scheduler = build_scheduler(optimizer, ScheduleConfig(kind="cosine", epochs=4, warmup_epochs=1), 5)
    stats = ScoreStatistics(2, width, use_gram=False)
    return model, optimizer, scheduler, stats


def train_steps(model, optimizer, scheduler, stats, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(8, 3)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    stats.proto_sum += 1.5
    stats.proto_count += 3


def make(tmp: Path, acc: Accelerator | None = None, width: int = 4, fingerprint: str = "fp1", **kw):
    acc = acc or Accelerator(cpu=True)
    model, optimizer, scheduler, stats = parts(width)
    log: list[str] = []
    saver = Checkpointer(acc, tmp, model=model, optimizer=optimizer, scheduler=scheduler, stats=stats,
                         fingerprint=fingerprint, log=log.append, **kw)
    return saver, log


def snapshot(saver: Checkpointer) -> dict:
    return {"model": {k: v.clone() for k, v in saver.model.state_dict().items()},
            "momentum": [saver.optimizer.state[p]["momentum_buffer"].clone() for p in saver.model.parameters()],
            "scheduler": saver.scheduler.state_dict(), "stats": saver.stats.proto_sum.clone()}


def same(a: dict, b: dict) -> bool:
    return (all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
            and all(torch.equal(x, y) for x, y in zip(a["momentum"], b["momentum"]))
            and a["scheduler"] == b["scheduler"] and torch.equal(a["stats"], b["stats"]))


def saved_run(tmp: Path, steps=(5, 10)) -> dict[int, dict]:
    """Checkpoints at `steps`; returns the snapshot saved at each."""
    saver, _ = make(tmp, keep_last=5)
    snaps = {}
    for step in steps:
        train_steps(saver.model, saver.optimizer, saver.scheduler, saver.stats, 5)
        saver.save(TrainerState(epoch=step // 5, global_step=step, wandb_run_id="w"))
        snaps[step] = snapshot(saver)
    return snaps


def test_round_trip_restores_everything_and_the_rng_stream(tmp_path):
    saver, _ = make(tmp_path)
    train_steps(saver.model, saver.optimizer, saver.scheduler, saver.stats, 7)
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    saver.save(TrainerState(epoch=1, global_step=7, best_value=0.5, history=[{"epoch": 1}]))
    expected = snapshot(saver)
    after = (random.random(), float(np.random.rand()), torch.rand(2))
    fresh, _ = make(tmp_path)
    state = fresh.restore()
    assert (state.global_step, state.best_value, state.history, state.fingerprint) == (7, 0.5, [{"epoch": 1}], "fp1")
    assert same(snapshot(fresh), expected) and fresh.scheduler.last_epoch == 7
    again = (random.random(), float(np.random.rand()), torch.rand(2))
    assert after[:2] == again[:2] and torch.equal(after[2], again[2])
    files = sorted(p.name for p in list_checkpoints(tmp_path)[0].iterdir())
    assert files == ["model.safetensors", "optimizer.json", "optimizer.safetensors", "rng.0.json",
                     "rng.0.safetensors", "scheduler.json", "stats.safetensors", "trainer_state.json"]


PICKLE_BOMB = """
import os
class Bomb:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
"""


def _bomb(marker: Path) -> bytes:
    namespace: dict = {}
    exec(PICKLE_BOMB.format(marker=marker), namespace)  # noqa: S102 - the attack under test
    return pickle.dumps(namespace["Bomb"]())


def test_crafted_pickles_in_a_run_folder_never_execute(tmp_path, monkeypatch):
    snaps = saved_run(tmp_path / "ckpt")
    marker = tmp_path / "MARKER"
    bomb = _bomb(marker)
    newest = list_checkpoints(tmp_path / "ckpt")[-1]
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "pytorch_model.bin"):
        (newest / name).write_bytes(bomb)
    # a newer folder in Accelerate's old pickled format, and one whose safetensors are pickles
    old_format = tmp_path / "ckpt" / "step_000000020"
    old_format.mkdir()
    (old_format / "trainer_state.json").write_text(json.dumps({"epoch": 4, "global_step": 20}))
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):
        (old_format / name).write_bytes(bomb)
    disguised = tmp_path / "ckpt" / "step_000000030"
    disguised.mkdir()
    (disguised / "trainer_state.json").write_text(json.dumps({"epoch": 6, "global_step": 30}))
    for name in ("model.safetensors", "optimizer.safetensors", "stats.safetensors", "rng.0.safetensors"):
        (disguised / name).write_bytes(bomb)

    def refuse(*args, **kwargs):
        raise AssertionError("restore must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    saver, log = make(tmp_path / "ckpt")
    state = saver.restore()
    assert state.global_step == 10 and same(snapshot(saver), snaps[10])
    assert not marker.exists()
    assert len(log) == 1 and "skipped unusable step_000000030 (model.safetensors unreadable" in log[0]
    assert "step_000000020 (no model.safetensors (holds custom_checkpoint_0.pkl, optimizer.bin, random_states_0.pkl, " \
           "scheduler.bin: an older pickled format, never loaded))" in log[0]


@pytest.mark.parametrize("damage", ["truncate_model", "garbage_optimizer_json", "no_scheduler", "bad_state"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    snaps = saved_run(tmp_path)
    newest = list_checkpoints(tmp_path)[-1]
    if damage == "truncate_model":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garbage_optimizer_json":
        (newest / "optimizer.json").write_text("{not json")
    elif damage == "no_scheduler":
        (newest / "scheduler.json").unlink()
    else:
        (newest / "trainer_state.json").write_text('{"global_step": "ten"}')
    saver, log = make(tmp_path)
    assert saver.restore().global_step == 5 and same(snapshot(saver), snaps[5])
    assert len(log) == 1 and log[0].startswith("checkpoints: skipped unusable step_000000010 (") \
        and log[0].endswith("; resuming from step_000000005")


def test_only_damaged_checkpoints_stop_the_run_in_one_line(tmp_path):
    """A trained run whose checkpoints are all unusable is never trained over (issue 20: it
    started from scratch before); tests/test_reliability_checkpoint_fit.py runs it through train.py."""
    saved_run(tmp_path, steps=(5,))
    (list_checkpoints(tmp_path)[0] / "model.safetensors").write_bytes(b"\0" * 10)
    saver, log = make(tmp_path)
    with pytest.raises(ConfigError, match=r"no usable checkpoint \(step_000000005 \(model.safetensors unreadable "
                                          r".*run.force_restart=true .* or choose another run.name"):
        saver.restore()


def test_resume_with_another_config_is_refused(tmp_path):
    saved_run(tmp_path, steps=(5,))
    changed, _ = make(tmp_path, fingerprint="fp2")
    with pytest.raises(ConfigError, match=r"another config \(fingerprint fp1 != fp2.*run.force_resume=true"):
        changed.restore()
    forced, _ = make(tmp_path, fingerprint="fp2", force_resume=True)
    assert forced.restore().global_step == 5
    wider, _ = make(tmp_path, width=6, force_resume=True)  # e.g. another latent_dim: never silently skipped
    with pytest.raises(ConfigError, match=r"does not fit the model of this config .*0.weight has shape \(4, 3\)"):
        wider.restore()


KILLER = """
import os, sys, torch
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.test_reliability_checkpoints import make, train_steps
from cssr_dist.engine import checkpoint as ckpt
from cssr_dist.engine.checkpoint import TrainerState
saver, _ = make(Path({tmp!r}), keep_last=5)
train_steps(saver.model, saver.optimizer, saver.scheduler, saver.stats, 5)
saver.save(TrainerState(epoch=1, global_step=5))
torch.save(saver.model.state_dict(), {tmp!r} + "/../expected.pt")
train_steps(saver.model, saver.optimizer, saver.scheduler, saver.stats, 5)
where = {where!r}
if where == "mid_file":  # the process dies with the model file half written
    real = ckpt.save_file
    def dying(tensors, path, metadata=None):
        if path.endswith("model.safetensors"):
            with open(path, "wb") as fh:
                fh.write(b"partial")
            os._exit(9)
        real(tensors, path, metadata=metadata)
    ckpt.save_file = dying
    saver.save(TrainerState(epoch=2, global_step=10))
else:  # the same step saved twice; killed after the old folder was renamed aside
    real_rename = Path.rename
    def dying_rename(self, target):
        out = real_rename(self, target)
        if Path(target).name.startswith(".old_"):
            os._exit(9)
        return out
    Path.rename = dying_rename
    saver.save(TrainerState(epoch=1, global_step=5))
"""


@pytest.mark.parametrize("where", ["mid_file", "between_renames"])
def test_kill_during_a_checkpoint_write_leaves_a_complete_one(tmp_path, where):
    folder = tmp_path / "ckpt"
    script = KILLER.format(root=str(ROOT), tmp=str(folder), where=where)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 9, out.stderr[-2000:]
    leftover = sorted(p.name for p in folder.iterdir())
    assert leftover == ([".tmp_step_000000010", "step_000000005"] if where == "mid_file"
                        else [".old_step_000000005", ".tmp_step_000000005"])
    saver, log = make(folder)
    assert saver.restore().global_step == 5
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)  # our own test file
    assert all(torch.equal(saver.model.state_dict()[k], v) for k, v in expected.items())
    assert sorted(p.name for p in folder.iterdir()) == ["step_000000005"]
    assert any("unfinished .tmp_step" in line for line in log)


def test_best_holds_weights_statistics_fingerprint_and_its_epoch(tmp_path):
    saver, _ = make(tmp_path)
    train_steps(saver.model, saver.optimizer, saver.scheduler, saver.stats, 3)
    sample = {"rows.features": torch.randn(5, 3), "cap": torch.tensor(5)}
    saver.save_best(epoch=2, best_value=0.75, score="s1", posthoc=sample)
    expected = snapshot(saver)
    other, _ = make(tmp_path)
    handed = {}
    meta = other.load_best(posthoc=lambda tensors, where: handed.update(tensors, where=where))
    assert meta == {"epoch": 2, "best_value": 0.75, "score": "s1", "fingerprint": "fp1"}
    assert handed.keys() == {"rows.features", "cap", "where"} and torch.equal(handed["rows.features"],
                                                                            sample["rows.features"])
    assert handed["where"].endswith("best/weights.safetensors")
    assert all(torch.equal(expected["model"][k], v) for k, v in other.model.state_dict().items())
    assert torch.equal(other.stats.proto_sum, expected["stats"])
    wider, _ = make(tmp_path, width=6)
    with pytest.raises(DataError, match=r"weights.safetensors: 0.weight has shape \(4, 3\), the model \(6, 3\).*config.yaml"):
        wider.load_best()
    (tmp_path / "best" / "weights.safetensors").write_bytes(_bomb(tmp_path / "MARKER"))
    with pytest.raises(DataError, match="is unreadable"):
        other.load_best()
    assert not (tmp_path / "MARKER").exists()


# ---------------------------------------------------------------- two ranks over gloo
def _rank_main(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    acc = Accelerator(cpu=True)
    saver, _ = make(Path(folder), acc=acc)
    model, optimizer = acc.prepare(saver.model, saver.optimizer)
    saver.model, saver.optimizer = model, optimizer
    train_steps(model, optimizer, saver.scheduler, saver.stats, 3)
    torch.manual_seed(100 + rank)
    saver.save(TrainerState(global_step=3))
    expected = {k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()}
    draw = torch.rand(1).item()
    fresh, _ = make(Path(folder), acc=acc)
    fresh.model, fresh.optimizer = acc.prepare(fresh.model, fresh.optimizer)
    state = fresh.restore()
    same_model = all(torch.equal(v, expected[k]) for k, v in acc.unwrap_model(fresh.model).state_dict().items())
    Path(out, f"{rank}.json").write_text(json.dumps({"step": state.global_step, "same_model": same_model,
                                                     "rng_continues": torch.rand(1).item() == draw}))
    acc.wait_for_everyone()
    acc.end_training()


@pytest.mark.timeout(90)
def test_two_ranks_save_and_restore_with_their_own_rng(tmp_path):
    mp.start_processes(_rank_main, args=(2, free_port(), str(tmp_path / "ckpt"), str(tmp_path)), nprocs=2,
                       start_method="spawn")  # fork after torch ran threads here can deadlock
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert results == [{"step": 3, "same_model": True, "rng_continues": True}] * 2
    files = sorted(p.name for p in (tmp_path / "ckpt" / "step_000000003").iterdir())
    assert "rng.0.safetensors" in files and "rng.1.safetensors" in files and not any(f.endswith((".pkl", ".bin"))
                                                                                     for f in files)
