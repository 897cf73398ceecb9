"""A loss that becomes NaN or inf stops the run at once (issue 20).

Detection keeps the no-sync rule (tests/test_no_sync.py): the host reads the window's loss sum
on logging steps, before every checkpoint and at epoch end; a non-finite step makes that sum
non-finite. The exact step and the last finite loss are kept on the device. So the run stops
at most `tracking.log_every` steps late, and never after writing a checkpoint or best/ of the
diverged model. Before issue 20 the run trained on and ended with exit 0.
"""

from __future__ import annotations

import math

import pytest

from cssr_dist.engine.trainer import TrainingDiverged
from cssr_dist.models.losses import build_loss
from tests.test_no_sync import STEPS, make_trainer, random_batches
from tests.test_reliability_e2e import train


def loss_that_diverges_at(step: int):
    """The real loss, then inf from optimisation step `step` (1-based) on; records the finite ones."""
    base = build_loss("rcssr")

    def loss_fn(logits, labels):
        loss = base(logits, labels)
        loss_fn.calls += 1
        if loss_fn.calls >= step:
            return loss * math.inf
        loss_fn.finite.append(float(loss.detach()))
        return loss

    loss_fn.calls, loss_fn.finite = 0, []
    return loss_fn


@pytest.mark.parametrize("log_every, seen_at", [(2, 4), (STEPS + 100, STEPS)])
def test_divergence_stops_training_with_step_and_last_finite_loss(log_every, seen_at):
    """log_every=2: seen at the log step 4 after step 3 diverged; no logging: at the epoch's end."""
    loss_fn = loss_that_diverges_at(3)
    trainer = make_trainer(log_every=log_every, loss_fn=loss_fn)
    with pytest.raises(TrainingDiverged) as err:
        trainer.train_epoch(random_batches())
    message = str(err.value)
    assert f"the loss became inf at step 3 (seen at step {seen_at}," in message
    if log_every == 2:  # step 3 opens a window: the last number the host has is the window of steps 1-2
        mean = sum(loss_fn.finite) / 2
        assert f"last logged loss {mean:.4g} (mean of the window up to step 2)" in message, message
    else:
        assert f"last finite loss {loss_fn.finite[-1]:.4g} (step 2)" in message, message
    assert "optim.lr=0.01" in message and "\n" not in message


def test_no_checkpoint_is_written_after_the_divergence():
    saved = []
    trainer = make_trainer(log_every=STEPS + 100, loss_fn=loss_that_diverges_at(2))
    trainer.cfg.run.checkpoint_every_steps = 3
    trainer._save = lambda: saved.append(trainer.state.global_step)
    with pytest.raises(TrainingDiverged, match="at step 2 \\(seen at step 3"):
        trainer.train_epoch(random_batches())
    assert saved == []


def test_fp16_names_precision_as_a_likely_cause():
    trainer = make_trainer(log_every=1, loss_fn=loss_that_diverges_at(1))
    trainer.cfg.run.mixed_precision = "fp16"
    with pytest.raises(TrainingDiverged, match="bf16"):
        trainer.train_epoch(random_batches())


def test_a_diverging_train_py_run_exits_non_zero_in_one_line_without_best(tmp_path):
    """optim.lr=1e30: the weights overflow after the first step."""
    proc = train(tmp_path, "run.name=div", "optim.lr=1.0e+30", "tracking.log_every=1000")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "training diverged: the loss became nan at step" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    run = tmp_path / "runs" / "div"
    assert not (run / "checkpoints" / "best").exists() and not (run / "summary.json").exists()
    assert not list((run / "checkpoints").glob("step_*"))
