"""Best-epoch selection (issue 19): ONE rule in `engine/trainer.py`, ties broken by a stated rule,
and the choice printed. Before, an equal validation accuracy kept the earliest epoch silently."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from cssr_dist.engine.checkpoint import TrainerState
from cssr_dist.engine.trainer import Trainer, best_epoch_line, better, images_per_s


def row(epoch: int, val_acc: float | None, val_loss: float | None) -> dict:
    return {"epoch": epoch, "val_acc": val_acc, "val_loss": val_loss}


@pytest.mark.parametrize("metric, new, best, expected", [
    ("val_acc", row(2, 0.91, 0.5), row(1, 0.90, 0.1), True),     # strictly better wins, loss ignored
    ("val_acc", row(2, 0.89, 0.1), row(1, 0.90, 0.5), False),    # strictly worse loses
    ("val_acc", row(2, 0.90, 0.30), row(1, 0.90, 0.35), True),   # tie: lower val_loss wins
    ("val_acc", row(2, 0.90, 0.40), row(1, 0.90, 0.35), False),  # tie: higher val_loss loses
    ("val_acc", row(2, 0.90, 0.35), row(1, 0.90, 0.35), False),  # full tie: the earlier epoch stays
    ("val_acc", row(2, 0.90, 0.35), row(1, 0.90, math.nan), True),  # a finite tie-breaker beats NaN
    ("val_acc", row(2, math.nan, 0.1), row(1, 0.5, 0.9), False),  # NaN never wins
    ("val_acc", row(1, 0.5, 0.9), None, True),                   # the first finite epoch
    ("val_acc", row(1, None, None), None, False),                # no validation: no best
    ("val_loss", row(2, 0.80, 0.30), row(1, 0.95, 0.31), True),  # lower loss wins, accuracy ignored
    ("val_loss", row(2, 0.92, 0.30), row(1, 0.90, 0.30), True),  # tie: higher val_acc wins
    ("val_loss", row(2, 0.88, 0.30), row(1, 0.90, 0.30), False),
])
def test_better_breaks_ties_by_the_other_validation_number(metric, new, best, expected):
    assert better(metric, new, best) is expected


def select(history: list[dict], metric: str) -> TrainerState:
    """The trainer's own selection over `history`, epoch by epoch (no model, no data)."""
    state = TrainerState()
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.state = SimpleNamespace(eval=SimpleNamespace(select_best_by=metric)), state
    saved = []
    for r in history:
        state.epoch = r["epoch"]
        trainer._select_best(r, lambda: saved.append(state.epoch))
        state.history.append(r)
    assert saved[-1] == state.best_epoch  # best/ written for the chosen epoch
    return state


def test_the_trainer_selects_the_tied_epoch_with_the_lower_loss_and_says_why():
    history = [row(1, 0.80, 0.60), row(2, 0.90, 0.40), row(3, 0.90, 0.30), row(4, 0.90, 0.35), row(5, 0.85, 0.20)]
    state = select(history, "val_acc")
    assert (state.best_epoch, state.best_value) == (3, 0.90)
    line = best_epoch_line(state.history, "val_acc", state.best_epoch)
    assert line == ("best epoch 3 (val_acc=0.9000, tied with epoch(s) 2, 4; tie broken by lower val_loss: "
                    "0.3000 vs epoch 2: 0.4000, epoch 4: 0.3500; then the earlier epoch)")


def test_a_full_tie_keeps_the_earlier_epoch_and_without_tie_the_line_states_the_rule():
    assert select([row(1, 0.9, 0.3), row(2, 0.9, 0.3)], "val_acc").best_epoch == 1
    state = select([row(1, 0.7, 0.3), row(2, 0.9, 0.5)], "val_loss")
    assert state.best_epoch == 1
    assert best_epoch_line(state.history, "val_loss", 1) == (
        "best epoch 1 (val_loss=0.3000, no tie; ties broken by higher val_acc, then the earlier epoch)")


def test_last_and_no_validation_are_said_as_such():
    assert select([row(1, 0.9, 0.3), row(2, 0.5, 0.9)], "last").best_epoch == 2
    assert best_epoch_line([], "last", 2).startswith("best epoch 2 (eval.select_best_by=last")
    assert best_epoch_line([row(1, None, None)], "val_acc", None).startswith("no best epoch (no epoch has a finite val_acc")


def test_run_images_per_s_is_total_images_over_total_training_loop_time():
    history = [{"images_per_s": 100.0, "train_s": 2.0}, {"images_per_s": 300.0, "train_s": 1.0}, {"epoch": 3}]
    assert images_per_s(history) == pytest.approx(500 / 3, abs=0.1)
    assert images_per_s([{"epoch": 1}]) is None
