"""The training loop on Accelerate: one epoch at a time, no host sync inside the step.

The loss is accumulated on the device and only read (`.item()`) on logging steps, because
each read stalls a GPU pipeline. Preemption is checked on those same steps so that all
ranks take the collective decision together.
"""

from __future__ import annotations

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

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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

    def _stop_reason(self) -> str | None:
        max_steps = self.cfg.run.max_steps
        if max_steps is not None and self.state.global_step >= max_steps:
            return "max_steps"
        return "preempted" if self.preemption.should_stop(self.accelerator) else None

    def train_epoch(self, batches, progress=None) -> StepResult:
        """Train over `batches` (already positioned after resume); update the state as it goes."""
        self.model.train()
        log_every = max(1, self.cfg.tracking.log_every)
        ckpt_every = self.cfg.run.checkpoint_every_steps
        loss_sum = torch.zeros((), device=self.accelerator.device)
        window_sum = torch.zeros((), device=self.accelerator.device)
        steps = window = 0
        stop = None
        for images, labels, _ in batches:
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
                self.on_checkpoint()
            if self.state.global_step % log_every == 0 or self.cfg.run.max_steps is not None:
                stop = self._stop_reason()
                if stop:
                    break
        mean = (self.accelerator.reduce(loss_sum, reduction="mean") / max(1, steps)).item()
        if stop is None:
            stop = self._stop_reason()
        return StepResult(mean_loss=mean, steps=steps, stop=stop)
