"""The Trainer: the epoch loop, best-model selection and the optimisation step, on Accelerate.

The loss is accumulated on the device and only read (`.item()`) on logging steps, because
each read stalls a GPU pipeline. Preemption is checked on those same steps so that all
ranks take the collective decision together. A loss that becomes NaN or inf is caught by
those same reads (a non-finite step makes the window's sum non-finite): on a logging step,
before every checkpoint and at the end of every epoch, so at most `tracking.log_every` steps
late and never after a checkpoint or `best/` of the diverged model is written; the exact
step and the last finite loss come from a device buffer of the window's losses (`DivergenceWatch`:
one small copy per step, read only when the run stops).
The best checkpoint is chosen on the validation slice of known classes (never on test metrics).
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import Config
from ..errors import CssrError
from ..models.osr_model import check_logit_saturation
from .checkpoint import TrainerState
from .preemption import Preempted, PreemptionFlag


class TrainingDiverged(CssrError):
    """The loss became NaN or inf: the run stops (exit 2) instead of training on garbage."""


class DivergenceWatch:
    """Each step's loss copied into a device buffer of one logging window: ONE kernel launch
    per step, no host read (tracking the first bad step with `torch.where` ops would launch about
    eight). `check(value, ...)` is called where the
    host reads a sum of losses anyway; when that sum is not finite it reads the window's
    losses once, on the way out, for the exact step and the last finite loss, and raises
    `TrainingDiverged` (one line)."""

    MAX_WINDOW = 4096  # longer windows (a huge tracking.log_every) give the step range, not the step

    def __init__(self, device: torch.device, window: int):
        self.losses = torch.zeros(min(max(1, window), self.MAX_WINDOW), dtype=torch.float32, device=device)
        self.last_logged = (math.nan, 0)  # (mean loss, step) of the last logging window, on the host

    def update(self, loss: torch.Tensor, position: int) -> None:
        """`position`: the step's index inside the current window (0-based)."""
        self.losses[position % len(self.losses)].copy_(loss.detach())

    def check(self, value: float, step: int, window: int, cfg: Config, where: str) -> None:
        """`value`: a host sum of losses; `window`: steps since the last logging step (<= buffer)."""
        if math.isfinite(value):
            if where == "a logging step":
                self.last_logged = (value, step)
            return
        losses = self.losses[:window].tolist() if window <= len(self.losses) else []  # only on the way out
        bad = next((i for i, x in enumerate(losses) if not math.isfinite(x)), None)
        first = step - window + 1 + bad if bad is not None else None
        if bad:  # a finite step before it in this window
            last = f"last finite loss {losses[bad - 1]:.4g} (step {first - 1})"
        else:
            last = f"last logged loss {self.last_logged[0]:.4g} (mean of the window up to step {self.last_logged[1]})"
        at = f"step {first}" if first is not None else f"a step up to {step}"
        value = losses[bad] if bad is not None else value
        cause = f"optim.lr={cfg.optim.lr} too high for this batch"
        if cfg.run.mixed_precision == "fp16":
            cause += " or fp16 overflow (try run.mixed_precision=bf16 or no)"
        raise TrainingDiverged(
            f"training diverged: the loss became {value} at {at} (seen at step {step}, {where}); {last}; "
            f"likely cause: {cause}. Checkpoints and best/ from before it are kept; resume with a "
            f"lower optim.lr and run.force_resume=true, or start a new run.name")


@dataclass
class StepResult:
    """What an epoch returns: mean loss and whether training must stop now."""

    mean_loss: float
    steps: int
    stop: str | None = None  # None | "preempted" | "max_steps"
    images: int = 0  # training images of this epoch (this attempt), all ranks
    seconds: float = 0.0  # wall time of the epoch's training loop (step checkpoints included)


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
    """Runs the epochs of a run: steps, per-epoch validation and records, best-model selection.

    It sees data only as `TrainBatches` (len, set_epoch, iter_from) and evaluation only
    through the `Evaluator`, so it knows nothing of data formats or scores.
    """

    def __init__(self, cfg: Config, accelerator, model, optimizer, scheduler, loss_fn: Callable,
                 state: TrainerState, preemption: PreemptionFlag, on_checkpoint: Callable[[], None],
                 classify: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """`classify(logits) -> class [B]` (the scorer's, pooled as the loss) gives the training
        accuracy that is logged with the loss."""
        self.classify = classify
        self.cfg = cfg
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.state = state
        self.preemption = preemption
        self._save = on_checkpoint
        self._clock = time.time()
        self.fail_at = failure_hook_from_env()
        self.divergence: DivergenceWatch | None = None  # made on the first epoch, on the run's device
        self._window = 0  # steps since the last logging step (the divergence buffer's position)

    def _count_time(self) -> None:
        """Add the wall time since the last count to `state.train_time_s`."""
        now = time.time()
        self.state.train_time_s += now - self._clock
        self._clock = now

    def on_checkpoint(self) -> None:
        """Save with the time up to now counted in, so an attempt that ends in preemption keeps its time."""
        self._count_time()
        self._save()

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
        if self.state.global_step == 0:  # a fresh run: stop at once if the logit scale saturates
            check_logit_saturation(self.accelerator.gather(out.logits.detach()),
                                   self.accelerator.unwrap_model(self.model).head, "the first training batch")
        loss = self.loss_fn(out.logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if self.cfg.optim.grad_clip:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        correct = (self.classify(out.logits.detach().float()) == labels).sum() if self.classify else loss.new_zeros(())
        self.divergence.update(loss, self._window)
        return torch.stack([loss.detach(), correct.to(loss.dtype)])

    def _log(self, window: torch.Tensor, steps: int, images: int, seconds: float) -> float:
        """One collective on log steps only: mean loss, accuracy and images/s over the window."""
        world = self.accelerator.num_processes
        loss_sum, correct = (self.accelerator.reduce(window, reduction="sum") / world).tolist()
        value = loss_sum / max(1, steps)
        self.divergence.check(value, self.state.global_step, steps, self.cfg, "a logging step")
        self.accelerator.log({"train/loss": value, "train/lr": self.scheduler.get_last_lr()[0],
                              "train/accuracy": correct / max(1, images),
                              "train/images_per_s": images * world / max(seconds, 1e-9),
                              "epoch": self.state.epoch + 1},  # the epoch these steps belong to, from 1
                             step=self.state.global_step)
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
        """Train over `batches` (already positioned after resume); update the state as it goes.

        The logging window is also flushed at the epoch's end, so `train/loss` is logged at least
        once per epoch (also when `tracking.log_every` exceeds an epoch's steps) and no step's
        loss is left out of the log."""
        self.model.train()
        log_every = max(1, self.cfg.tracking.log_every)
        if self.divergence is None:
            self.divergence = DivergenceWatch(self.accelerator.device, log_every)
        ckpt_every = self.cfg.run.checkpoint_every_steps
        if self.state.step_in_epoch == 0:  # a fresh epoch; else resume its running loss
            self.state.epoch_loss_sum, self.state.epoch_loss_steps = 0.0, 0
        base = (self.state.epoch_loss_sum, self.state.epoch_loss_steps)
        loss_sum = torch.zeros((), device=self.accelerator.device)
        window_sum = torch.zeros(2, device=self.accelerator.device)  # loss sum, correct predictions
        steps = window_images = epoch_images = self._window = 0
        epoch_start = window_start = time.perf_counter()
        stop = None

        def flush() -> None:
            nonlocal window_images, window_start
            value = self._log(window_sum, self._window, window_images, time.perf_counter() - window_start)
            window_sum.zero_()
            self._window = window_images = 0
            window_start = time.perf_counter()
            if progress is not None:
                progress.set_postfix(loss=f"{value:.4f}")

        for images, labels, _ in batches:
            if self.fail_at is not None:
                self._maybe_fail()
            step = self._step(images, labels)
            loss_sum += step[0]
            window_sum += step
            steps += 1
            self._window += 1
            window_images += labels.shape[0]
            epoch_images += labels.shape[0]
            self.state.global_step += 1
            self.state.step_in_epoch += 1
            if progress is not None:
                progress.update(1)
            if self.state.global_step % log_every == 0:
                flush()
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
        if self._window:  # the epoch's last steps since the last logging step
            flush()
        mean = self._record_epoch_loss(base, loss_sum, steps)
        seconds = time.perf_counter() - epoch_start
        if stop is None:
            stop = self._stop_reason()
        return StepResult(mean_loss=mean, steps=steps, stop=stop,
                          images=epoch_images * self.accelerator.num_processes, seconds=seconds)

    def _record_epoch_loss(self, base: tuple[float, int], loss_sum: torch.Tensor, steps: int) -> float:
        """Collective. Puts the epoch's loss so far (before a resume + since) into the state
        (checkpoints carry it) and returns the epoch's mean loss per step."""
        total = base[0] + self.accelerator.reduce(loss_sum, reduction="mean").item()
        self.divergence.check(total, self.state.global_step, self._window, self.cfg,
                              "before a checkpoint or the epoch's end")
        self.state.epoch_loss_sum, self.state.epoch_loss_steps = total, base[1] + steps
        return total / max(1, base[1] + steps)

    # ------------------------------------------------------------------ epochs
    def fit(self, train, evaluator, save_best: Callable[[], None], record: Callable[[dict], None],
            progress: Callable[..., Any]) -> None:
        """Train until the schedule ends (or max_steps), validating each epoch; raises Preempted."""
        cfg, state, acc = self.cfg, self.state, self.accelerator
        start = self._clock = time.time()
        while state.epoch < cfg.schedule.epochs and not state.finished:
            train.set_epoch(state.epoch)
            bar = progress(None, f"epoch {state.epoch + 1}/{cfg.schedule.epochs}", total=len(train))
            bar.update(state.step_in_epoch)
            result = self.train_epoch(train.iter_from(state.step_in_epoch), bar)
            bar.close()
            if result.stop == "preempted":
                self.on_checkpoint()
                acc.print(f"preempted at step {state.global_step} ({position(state, cfg.schedule.epochs, len(train))}); "
                          "checkpoint written, exiting for requeue")
                raise Preempted()
            epoch_done = state.step_in_epoch >= len(train)
            if epoch_done:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            last = state.epoch >= cfg.schedule.epochs or result.stop == "max_steps"
            row = {"epoch": state.epoch, "step": state.global_step, "train_loss": result.mean_loss,
                   "lr": self.scheduler.get_last_lr()[0], "time_s": round(time.time() - start, 2),
                   "train_s": round(result.seconds, 3),
                   "images_per_s": round(result.images / max(result.seconds, 1e-9), 1),
                   **evaluator.validate(self.model)}
            interval = cfg.eval.test_interval
            if interval and epoch_done and state.epoch % interval == 0 and not last:
                row["test"] = {k: v for k, v in evaluator.evaluate(self.model).items() if isinstance(v, (int, float))}
            self._select_best(row, save_best)
            state.history.append(row)
            record(row)
            acc.log({f"epoch/{k}": v for k, v in row.items() if isinstance(v, (int, float))}, step=state.global_step)
            acc.print(epoch_line(row, None if epoch_done else position(state, cfg.schedule.epochs, len(train))))
            state.finished = last
            self.on_checkpoint()
            if not last and self.preemption.should_stop(acc):  # signalled during evaluation or the write
                acc.print(f"preempted at step {state.global_step} ({position(state, cfg.schedule.epochs, len(train))}); "
                          "checkpoint written, exiting for requeue")
                raise Preempted()
        self._count_time()

    def _select_best(self, row: dict, save_best: Callable[[], None]) -> None:
        """Keep the weights of the best epoch by `eval.select_best_by` (validation only; ties
        broken by `better`)."""
        key = self.cfg.eval.select_best_by
        best_row = next((r for r in self.state.history if r.get("epoch") == self.state.best_epoch), None)
        if key == "last" or better(key, row, best_row if self.state.best_epoch is not None else None):
            self.state.best_value, self.state.best_epoch = row.get(key), self.state.epoch
            save_best()


#: What breaks a tie of `eval.select_best_by` (equal values, as equal accuracies on the
#: validation slice often are): the other validation number, then the earlier epoch.
TIE_BREAK = {"val_acc": ("val_loss", "lower"), "val_loss": ("val_acc", "higher")}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _beats(metric: str, value: Any, other: Any) -> bool:
    """`value` strictly better than `other` for `metric` (lower is better for val_loss only);
    a missing or non-finite value never beats, and any finite value beats a missing one."""
    if not _finite(value):
        return False
    if not _finite(other):
        return True
    return value < other if metric == "val_loss" else value > other


def better(metric: str, row: dict, best: dict | None) -> bool:
    """Whether epoch `row` replaces `best` (None: no best yet) under `metric`: a strictly better
    value wins; on an equal value, `TIE_BREAK[metric]` decides (lower val_loss for val_acc,
    higher val_acc for val_loss); on a full tie the earlier epoch stays. The ONE selection rule."""
    value = row.get(metric)
    if not _finite(value):
        return False
    if best is None or not _finite(best.get(metric)):
        return True
    if value != best[metric]:
        return _beats(metric, value, best[metric])
    other = TIE_BREAK[metric][0]
    return _beats(other, row.get(other), best.get(other))


def best_epoch_line(history: list[dict], metric: str, best_epoch: int | None) -> str:
    """The line printed once at the end: which epoch was selected, by what, and how a tie was
    broken (or that there was none)."""
    if metric == "last":
        return f"best epoch {best_epoch} (eval.select_best_by=last: the last epoch, no comparison)"
    best = next((r for r in history if r.get("epoch") == best_epoch), None)
    if best is None:
        return (f"no best epoch (no epoch has a finite {metric}: no validation slice?); "
                "the last weights are evaluated")
    other, direction = TIE_BREAK[metric]
    rule = f"ties broken by {direction} {other}, then the earlier epoch"
    tied = [r["epoch"] for r in history if r is not best and r.get(metric) == best[metric]]
    if not tied:
        return f"best epoch {best_epoch} ({metric}={best[metric]:.4f}, no tie; {rule})"
    tie_values = ", ".join(f"epoch {r['epoch']}: {_fmt(r.get(other))}" for r in history
                           if r.get("epoch") in tied)
    return (f"best epoch {best_epoch} ({metric}={best[metric]:.4f}, tied with epoch(s) "
            f"{', '.join(map(str, tied))}; tie broken by {direction} {other}: {_fmt(best.get(other))} vs "
            f"{tie_values}; then the earlier epoch)")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if _finite(value) else str(value)


def images_per_s(history: list[dict]) -> float | None:
    """Training images per second over the run's epochs (their training loops: validation and
    evaluation left out), from the epoch rows; None when no row has it."""
    rows = [r for r in history if _finite(r.get("images_per_s")) and _finite(r.get("train_s"))]
    seconds = sum(r["train_s"] for r in rows)
    return round(sum(r["images_per_s"] * r["train_s"] for r in rows) / seconds, 1) if seconds > 0 else None


def position(state: TrainerState, epochs: int, steps_per_epoch: int) -> str:
    """Where training stands, epochs counted from 1 as in the epoch lines and history rows
    (`state.epoch` counts FINISHED epochs): the preemption and the resume lines say the same."""
    if state.step_in_epoch and state.step_in_epoch < steps_per_epoch:
        return f"in epoch {state.epoch + 1}/{epochs} at step {state.step_in_epoch}/{steps_per_epoch}"
    done = state.epoch + (1 if state.step_in_epoch else 0)
    return f"end of epoch {done}/{epochs}" if done else f"before epoch 1/{epochs}"


def epoch_line(row: dict, partial: str | None = None) -> str:
    """The one line printed per epoch (rank 0); `partial`: where run.max_steps stopped an
    unfinished epoch (`row['epoch']` counts finished ones, so it would read one epoch early)."""
    head = f"epoch {row['epoch']}" if partial is None else f"stopped by run.max_steps {partial}"
    parts = [head, f"loss {row['train_loss']:.4f}"]
    if "val_acc" in row:
        parts.append(f"val_acc {row['val_acc']:.4f}")
    for key in ("closed_acc", "auroc", "oscr", "oscr_to_1"):  # oscr_to_1: reference protocol
        if key in (row.get("test") or {}):
            parts.append(f"{key} {row['test'][key]:.4f}")
    return " | ".join(parts)
