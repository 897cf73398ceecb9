"""A checkpoint is applied only if every part of it fits (issue 20).

Each case damages or crafts ONE part of the newest of two real checkpoints (model and
statistics tensors, optimizer state and groups, scheduler, trainer state) in a way that
safetensors/JSON still parse. Before issue 20 these loaded silently (a NaN model, a step past
the schedule, a string as the best value, a momentum buffer of another shape); now the
checkpoint is unusable: one line, the previous one is restored, and nothing of the bad one is
half-applied (model, momentum, schedule and statistics equal the previous checkpoint's).

The last test runs the "every checkpoint unusable" case through train.py: the run stops in
one line and its folder stays byte-identical; `run.force_restart=true` sets it aside.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cssr_dist.engine.checkpoint import TrainerState, list_checkpoints
from tests.test_reliability_checkpoints import make, same, saved_run, snapshot
from tests.test_reliability_e2e import digest, train


def _tensors(file: Path, change) -> None:
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))


def _json(file: Path, change) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data, allow_nan=True))


def _first(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def nan_weight(t):
    k = _first(t, "weight")
    t[k] = t[k].clone()
    t[k].view(-1)[0] = math.nan


def as_float64(t):
    k = _first(t, "weight")
    t[k] = t[k].double()


def wrong_momentum_shape(t):
    k = _first(t, "momentum_buffer")
    t[k] = torch.zeros(t[k].numel() + 1)


def momentum_of_no_parameter(t):
    t["state.99.momentum_buffer"] = torch.zeros(2)


def inf_momentum(t):
    k = _first(t, "momentum_buffer")
    t[k] = torch.full_like(t[k], math.inf)


def nan_statistics(t):
    t["proto_sum"] = torch.full_like(t["proto_sum"], math.nan)


CASES = {
    "model: NaN weight": ("model.safetensors", _tensors, nan_weight, "holds NaN or inf"),
    "model: float64 weight": ("model.safetensors", _tensors, as_float64, "is torch.float64, the model's torch.float32"),
    "optimizer: momentum of another shape": ("optimizer.safetensors", _tensors, wrong_momentum_shape, "has shape"),
    "optimizer: state of parameter 99": ("optimizer.safetensors", _tensors, momentum_of_no_parameter,
                                         "names no parameter"),
    "optimizer: inf momentum": ("optimizer.safetensors", _tensors, inf_momentum, "holds NaN or inf"),
    "optimizer: lr as a string": ("optimizer.json", _json,
                                  lambda d: d["param_groups"][0].update(lr="0.5"), "lr = '0.5' is not a finite number"),
    "optimizer: another group layout": ("optimizer.json", _json,
                                        lambda d: d["param_groups"][0].update(params=[0, 1]), "parameter group 0"),
    "optimizer: two groups": ("optimizer.json", _json,
                              lambda d: d["param_groups"].append(d["param_groups"][0]), "2 parameter groups"),
    "scheduler: step past the trainer's": ("scheduler.json", _json, lambda d: d.update(last_epoch=99999),
                                           "scheduler.json is at step 99999"),
    "scheduler: base_lrs of another size": ("scheduler.json", _json, lambda d: d.update(base_lrs=[]),
                                            "base_lrs does not match"),
    "state: negative step": ("trainer_state.json", _json, lambda d: d.update(global_step=-1), "global_step = -1"),
    "state: epoch past the schedule": ("trainer_state.json", _json, lambda d: d.update(epoch=50),
                                       "epoch = 50 is outside this run's schedule"),
    "state: step past the schedule": ("trainer_state.json", _json, lambda d: d.update(global_step=21),
                                      "global_step = 21 is outside"),
    "state: best value a string": ("trainer_state.json", _json, lambda d: d.update(best_value="high"),
                                   "best_value = 'high'"),
    "state: best value NaN": ("trainer_state.json", _json, lambda d: d.update(best_value=math.nan), "best_value = nan"),
    "state: time NaN": ("trainer_state.json", _json, lambda d: d.update(train_time_s=math.inf), "train_time_s = inf"),
    "state: best epoch in the future": ("trainer_state.json", _json, lambda d: d.update(best_epoch=7), "best_epoch = 7"),
    "state: finished as a string": ("trainer_state.json", _json, lambda d: d.update(finished="no"), "finished = 'no'"),
    "state: W&B id that is a path": ("trainer_state.json", _json, lambda d: d.update(wandb_run_id="../../x"),
                                     "wandb_run_id = '../../x'"),
    "state: history not a list": ("trainer_state.json", _json, lambda d: d.update(history="x"), "history"),
    "statistics: NaN": ("stats.safetensors", _tensors, nan_statistics, "holds NaN or inf"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_newest_checkpoint_that_does_not_fit_is_unusable_and_nothing_of_it_is_applied(tmp_path, case):
    file, edit, change, reason = CASES[case]
    snaps = saved_run(tmp_path)
    edit(list_checkpoints(tmp_path)[-1] / file, change)
    saver, log = make(tmp_path, keep_last=5, schedule=(4, 5))  # 4 epochs x 5 steps: at most step 20
    state = saver.restore()
    assert state is not None and state.global_step == 5, log
    assert same(snapshot(saver), snaps[5])  # the previous checkpoint, whole; nothing of step 10
    assert len(log) == 1 and log[0].startswith("checkpoints: skipped unusable step_000000010 (") \
        and log[0].endswith("resuming from step_000000005"), log
    assert reason in log[0], log[0]


def test_a_checkpoint_that_fits_still_restores_whole(tmp_path):
    """Control: the same checks pass an untouched checkpoint (so every case above is the fault)."""
    snaps = saved_run(tmp_path)
    saver, log = make(tmp_path, keep_last=5, schedule=(4, 5))
    assert saver.restore().global_step == 10 and same(snapshot(saver), snaps[10]) and log == []


def test_trainer_state_types_are_checked_field_by_field():
    TrainerState(epoch=1, global_step=5, best_value=0.5, best_epoch=1, train_time_s=3).check((4, 5))
    # preempted on an epoch's last step, before its validation: 5 of 5 steps done (a Slurm test met it)
    TrainerState(epoch=0, step_in_epoch=5, global_step=5).check((4, 5))
    for bad in ({"epoch": True}, {"global_step": 2.5}, {"epoch_loss_sum": "1"}, {"fingerprint": "a b"},
                {"step_in_epoch": 6}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainerState(**bad).check((4, 5))


def test_a_trained_run_whose_every_checkpoint_is_unusable_stops_and_force_restart_sets_it_aside(tmp_path):
    """train.py: killed at step 8 (checkpoints at 3 and 6, epoch 1 done: best/ and a history row);
    both checkpoints damaged. The next start stops in one line naming run.force_restart and
    changes nothing (it trained from scratch over history and best/ before); with
    run.force_restart=true the old run moves to replaced_1/ and a new one trains."""
    killed = train(tmp_path, "run.name=r", "run.checkpoint_every_steps=3",
                   env={"CSSR_FAIL_RANK": "0", "CSSR_FAIL_STEP": "8", "CSSR_FAIL_MODE": "exit"})
    assert killed.returncode == 13, killed.stderr[-2000:]
    run = tmp_path / "runs" / "r"
    steps = list_checkpoints(run / "checkpoints")
    assert len(steps) == 2 and (run / "checkpoints" / "best").is_dir()
    for step in steps:
        (step / "model.safetensors").write_bytes(b"\0" * 16)
    before = digest(run)
    again = train(tmp_path, "run.name=r", "run.checkpoint_every_steps=3")
    assert again.returncode == 2, again.stderr[-2000:]
    errors = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no usable checkpoint (step_000000006 (model.safetensors unreadable" in errors[0]
    assert "run.force_restart=true" in errors[0] and "Traceback" not in again.stderr
    assert {k: v for k, v in digest(run).items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
    restarted = train(tmp_path, "run.name=r", "run.checkpoint_every_steps=3", "run.force_restart=true")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "moved to" in restarted.stdout + restarted.stderr
    kept = digest(run / "replaced_1")
    assert {k: v for k, v in before.items() if k != ".lock"} == {k: v for k, v in kept.items() if k != ".lock"}
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2] and (run / "summary.json").is_file()
