"""The training loop on Accelerate: one epoch at a time, no host sync inside the step.

The loss is accumulated on the device and only read (`.item()`) on logging steps, because
each read stalls a GPU pipeline. Preemption is checked on those same steps so that all
ranks take the collective decision together.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import Config
from .checkpoint import TrainerState
from .preemption import PreemptionFlag


@dataclass
class StepResult:
    """What an epoch returns: mean loss and whether training must stop now."""

    mean_loss: float
    steps: int
    stop: str | None = None  # None | "preempted" | "max_steps"


def failure_hook_from_env() -> tuple[int, int, str] | None:
    """TEST HOOK (not a feature): `CSSR_FAIL_RANK=r CSSR_FAIL_STEP=s [CSSR_FAIL_MODE=m]`.

    Makes global rank r fail just before optimisation step s (1-based), so tests can check
    that a dying rank brings every rank down without hangs and that a run killed mid-epoch
    resumes exactly. Modes: 'raise' (a Python exception, the default), 'exit' (os._exit(13),
    no cleanup), 'kill' (SIGKILL to itself, as `kill -9` or the OOM killer would), 'hang'
    (sleeps for ever and ignores SIGTERM: only the process-group timeout, CSSR_DIST_TIMEOUT_S,
    gets the other ranks out of their collective).
    """
    rank, step = os.environ.get("CSSR_FAIL_RANK"), os.environ.get("CSSR_FAIL_STEP")
    if rank is None or step is None:
        return None
    return int(rank), int(step), os.environ.get("CSSR_FAIL_MODE", "raise")


def _fail_now(rank: int, step: int, mode: str) -> None:
    message = f"CSSR_FAIL test hook: rank {rank} fails at step {step} (mode {mode})"
    print(message, flush=True)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "exit":
        os._exit(13)
    if mode == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(3600)
    raise RuntimeError(message)


class Trainer:
    """Runs optimisation steps; knows nothing about datasets or evaluation."""

    def __init__(self, cfg: Config, accelerator, model, optimizer, scheduler, loss_fn: Callable,
                 state: TrainerState, preemption: PreemptionFlag, on_checkpoint: Callable[[], None]):
        self.cfg = cfg
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.state = state
        self.preemption = preemption
        self.on_checkpoint = on_checkpoint
        self.fail_at = failure_hook_from_env()

    def _maybe_fail(self) -> None:
        """The CSSR_FAIL_* test hook (see `failure_hook_from_env`)."""
        rank, step, mode = self.fail_at
        if self.accelerator.process_index == rank and self.state.global_step + 1 == step:
            _fail_now(rank, step, mode)

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        device = self.accelerator.device  # shard loaders are not prepared: move here (no-op otherwise)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with self.accelerator.autocast():
            out = self.model(images)
        loss = self.loss_fn(out.logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if self.cfg.optim.grad_clip:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def _log(self, loss_sum: torch.Tensor, count: int) -> float:
        value = (self.accelerator.reduce(loss_sum, reduction="mean") / max(1, count)).item()
        self.accelerator.log({"train/loss": value, "train/lr": self.scheduler.get_last_lr()[0],
                              "epoch": self.state.epoch}, step=self.state.global_step)
        return value

    def _max_steps_reached(self) -> bool:
        """Local integer check (every rank counts the same steps): no collective, no sync."""
        max_steps = self.cfg.run.max_steps
        return max_steps is not None and self.state.global_step >= max_steps

    def _stop_reason(self) -> str | None:
        """Collective on several ranks (the preemption flag is all-reduced): call on log steps."""
        if self._max_steps_reached():
            return "max_steps"
        return "preempted" if self.preemption.should_stop(self.accelerator) else None

    def train_epoch(self, batches, progress=None) -> StepResult:
        """Train over `batches` (already positioned after resume); update the state as it goes."""
        self.model.train()
        log_every = max(1, self.cfg.tracking.log_every)
        ckpt_every = self.cfg.run.checkpoint_every_steps
        if self.state.step_in_epoch == 0:  # a fresh epoch; else resume its running loss
            self.state.epoch_loss_sum, self.state.epoch_loss_steps = 0.0, 0
        base = (self.state.epoch_loss_sum, self.state.epoch_loss_steps)
        loss_sum = torch.zeros((), device=self.accelerator.device)
        window_sum = torch.zeros((), device=self.accelerator.device)
        steps = window = 0
        stop = None
        for images, labels, _ in batches:
            if self.fail_at is not None:
                self._maybe_fail()
            loss = self._step(images, labels)
            loss_sum += loss
            window_sum += loss
            steps += 1
            window += 1
            self.state.global_step += 1
            self.state.step_in_epoch += 1
            if progress is not None:
                progress.update(1)
            if self.state.global_step % log_every == 0:
                value = self._log(window_sum, window)
                window_sum.zero_()
                window = 0
                if progress is not None:
                    progress.set_postfix(loss=f"{value:.4f}")
            if ckpt_every and self.state.global_step % ckpt_every == 0:
                self._record_epoch_loss(base, loss_sum, steps)
                self.on_checkpoint()
            if self._max_steps_reached():
                stop = "max_steps"
                break
            if self.state.global_step % log_every == 0:
                stop = self._stop_reason()
                if stop:
                    break
        mean = self._record_epoch_loss(base, loss_sum, steps)
        if stop is None:
            stop = self._stop_reason()
        return StepResult(mean_loss=mean, steps=steps, stop=stop)

    def _record_epoch_loss(self, base: tuple[float, int], loss_sum: torch.Tensor, steps: int) -> float:
        """Collective. Puts the epoch's loss so far (before a resume + since) into the state
        (checkpoints carry it) and returns the epoch's mean loss per step."""
        total = base[0] + self.accelerator.reduce(loss_sum, reduction="mean").item()
        self.state.epoch_loss_sum, self.state.epoch_loss_steps = total, base[1] + steps
        return total / max(1, base[1] + steps)
