"""Checkpoint atomicity and pruning, gathering by sample id, strided eval sharding."""

import json

import numpy as np
import torch
from accelerate import Accelerator

from cssr_dist.engine.checkpoint import (Checkpointer, TrainerState, latest_checkpoint, list_checkpoints,
                                         load_weights, save_weights)
from cssr_dist.data.readers.native import eval_loader
from cssr_dist.distributed import gather_by_id


def test_shards_cover_exactly_once():
    data = list(range(11))
    shards = [[int(x) for batch in eval_loader(data, 2, 0, r, 3) for x in batch] for r in range(3)]
    assert sorted(sum(shards, [])) == data
    assert [len(s) for s in shards] == [4, 4, 3]


def test_gather_by_id_deduplicates_and_sorts():
    local = {"ids": np.array([3, 1, 3, 2]), "score": np.array([0.3, 0.1, 0.3, 0.2])}
    out = gather_by_id(local, world_size=1)
    assert out["ids"].tolist() == [1, 2, 3] and out["score"].tolist() == [0.1, 0.2, 0.3]


def test_checkpoints_are_atomic_pruned_and_restorable(tmp_path):
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    saver = Checkpointer(acc, tmp_path, model=model, optimizer=opt, keep_last=2)
    for step in (10, 20, 30):
        state = TrainerState(epoch=step // 10, global_step=step, wandb_run_id="w1")
        saver.save(state)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000020", "step_000000030"]
    saved = model.weight.detach().clone()
    (tmp_path / ".tmp_step_000000040").mkdir()  # a write killed half-way is ignored
    assert latest_checkpoint(tmp_path).name == "step_000000030"
    with torch.no_grad():
        model.weight.add_(1.0)
    restored = saver.restore()
    assert (restored.global_step, restored.wandb_run_id) == (30, "w1")
    assert torch.equal(model.weight.detach(), saved)
    assert json.loads((latest_checkpoint(tmp_path) / "trainer_state.json").read_text())["epoch"] == 3


def test_weights_round_trip_without_pickle(tmp_path):
    tensors = {"model.w": torch.arange(6.0).view(2, 3), "stats.n": torch.tensor([2.0], dtype=torch.float64)}
    save_weights(tmp_path / "best", tensors, {"epoch": 4})
    back, meta = load_weights(tmp_path / "best")
    assert meta == {"epoch": 4}
    assert torch.equal(back["model.w"], tensors["model.w"]) and back["stats.n"].dtype == torch.float64


def test_every_checkpoint_carries_the_training_time_so_far(monkeypatch):
    """A preempted attempt's time reaches summary.json: the time is counted into the state
    before each save, not only when `fit` ends."""
    from cssr_dist.config import Config
    from cssr_dist.engine import trainer as trainer_module
    from cssr_dist.engine.preemption import PreemptionFlag

    flag = PreemptionFlag(signals=())
    clock = iter([100.0, 130.0, 175.0])
    monkeypatch.setattr(trainer_module.time, "time", lambda: next(clock))
    state, saved = TrainerState(train_time_s=10.0), []
    trainer = trainer_module.Trainer(Config(), None, None, None, None, None, state, flag,
                                     lambda: saved.append(state.train_time_s))
    trainer.on_checkpoint()
    trainer.on_checkpoint()
    assert saved == [40.0, 85.0]


def test_positions_count_epochs_from_1_as_the_epoch_lines_do():
    """`state.epoch` counts finished epochs; the preemption and resume lines say the epoch the
    user sees in the epoch lines and history (1-based), mid-epoch or at its end."""
    from cssr_dist.engine.trainer import epoch_line, position

    assert position(TrainerState(epoch=0, step_in_epoch=5, global_step=5), 2, 33) == "in epoch 1/2 at step 5/33"
    assert position(TrainerState(epoch=1, step_in_epoch=0, global_step=33), 2, 33) == "end of epoch 1/2"
    assert position(TrainerState(epoch=1, step_in_epoch=7, global_step=40), 2, 33) == "in epoch 2/2 at step 7/33"
    assert position(TrainerState(epoch=0, step_in_epoch=33, global_step=33), 2, 33) == "end of epoch 1/2"
    assert position(TrainerState(), 2, 33) == "before epoch 1/2"
    row = {"epoch": 0, "train_loss": 1.5, "val_acc": 0.25}  # run.max_steps=5 ended the first epoch early
    assert epoch_line(row, position(TrainerState(step_in_epoch=5, global_step=5), 2, 33)) == \
        "stopped by run.max_steps in epoch 1/2 at step 5/33 | loss 1.5000 | val_acc 0.2500"
    assert epoch_line({**row, "epoch": 1}) == "epoch 1 | loss 1.5000 | val_acc 0.2500"


def test_training_rows_log_the_epoch_their_steps_belong_to_from_1():
    """W&B's `epoch` of the train/* rows is the epoch in progress, as the epoch lines count it:
    1 during the first epoch (state.epoch = 0 finished epochs), 2 during the second."""
    from types import SimpleNamespace

    from cssr_dist.config import Config
    from cssr_dist.engine.preemption import PreemptionFlag
    from cssr_dist.engine.trainer import DivergenceWatch, Trainer

    logged = []
    acc = SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, log=lambda row, step: logged.append(row))
    scheduler = SimpleNamespace(get_last_lr=lambda: [0.1])
    for finished, expected in ((0, 1), (1, 2)):
        state = TrainerState(epoch=finished, step_in_epoch=3, global_step=3)
        trainer = Trainer(Config(), acc, None, None, scheduler, None, state, PreemptionFlag(signals=()), lambda: None)
        trainer.divergence = DivergenceWatch(torch.device("cpu"), 4)
        trainer._log(torch.tensor([3.0, 6.0]), 3, 12, 1.0)
        assert logged[-1]["epoch"] == expected and logged[-1]["train/loss"] == 1.0
