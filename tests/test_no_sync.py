"""The training step reads nothing back to the host unless logging asks for it.

Every device -> host read (`.item()`, `.cpu()`, `.tolist()`, `.numpy()`, and the implicit
ones: `bool(t)`, `float(t)`, `int(t)`, `t.__index__`) stalls a GPU pipeline until all queued
kernels are done. On CPU there is no pipeline to stall, but the same Python calls are made,
so counting them here (monkeypatched wrappers on `torch.Tensor`) catches a sync before it
reaches a GPU. Syncs that happen inside C++ (e.g. boolean-mask indexing, `nonzero`) are not
visible this way; benchmarks/bench_gpu.py checks those with `torch.cuda.set_sync_debug_mode`.
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from accelerate import Accelerator

from cssr_dist.config import Config, ModelConfig
from cssr_dist.engine.checkpoint import TrainerState
from cssr_dist.engine.optim import build_optimizer
from cssr_dist.engine.preemption import PreemptionFlag
from cssr_dist.engine.schedule import build_scheduler
from cssr_dist.engine.trainer import Trainer
from cssr_dist.models.losses import build_loss
from cssr_dist.models.osr_model import build_model

SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
STEPS = 6
K = 3


class SyncCounter:
    """Records (method, calling function) for every host read while `active`."""

    def __init__(self) -> None:
        self.active = False
        self.calls: list[tuple[str, str]] = []

    def wrap(self, name: str, original):
        counter = self

        def wrapper(tensor, *args, **kwargs):
            if counter.active:
                caller = sys._getframe(1).f_code.co_name
                counter.calls.append((name, caller))
            return original(tensor, *args, **kwargs)

        return wrapper

    def by_caller(self) -> Counter:
        return Counter(caller for _, caller in self.calls)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny steps: a second OpenMP thread only waits for a core on a shared machine (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def sync_counter(monkeypatch) -> SyncCounter:
    counter = SyncCounter()
    for name in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counter.wrap(name, getattr(torch.Tensor, name)))
    return counter


def make_trainer(log_every: int, grad_clip: float | None = None, loss_fn=None) -> Trainer:
    cfg = Config()
    cfg.model = ModelConfig(backbone="osr_cnn", head="rcssr", latent_dim=8)
    cfg.tracking.wandb = False
    cfg.tracking.log_every = log_every
    cfg.optim.lr = 0.01
    cfg.optim.grad_clip = grad_clip
    assert cfg.run.max_steps is None
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_model(cfg.model, K, in_chans=1)
    optimizer = build_optimizer(model.parameters(), cfg.optim, global_batch=4)
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, cfg.schedule, STEPS)
    return Trainer(cfg, acc, model, optimizer, scheduler, loss_fn or build_loss("rcssr"), TrainerState(),
                   PreemptionFlag(signals=()), on_checkpoint=lambda: None)


def random_batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, K, (4,), generator=g), torch.arange(4))
            for _ in range(n)]


def run_counted(trainer: Trainer, counter: SyncCounter):
    before = [p.detach().clone() for p in trainer.model.parameters()]
    counter.active = True
    try:
        result = trainer.train_epoch(random_batches())
    finally:
        counter.active = False
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))
    return result, changed


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_no_host_sync_inside_steps_without_logging(sync_counter, grad_clip):
    trainer = make_trainer(log_every=STEPS + 100, grad_clip=grad_clip)
    result, changed = run_counted(trainer, sync_counter)
    assert result.steps == STEPS and trainer.state.global_step == STEPS
    assert changed, "the steps did not train (test would be vacuous)"
    assert torch.isfinite(torch.tensor(result.mean_loss))
    # nothing per step: at the epoch's end the loss reduction and the flush of the logging window
    # (train/loss at least once per epoch), and the one-time logit-saturation check of a fresh
    # run's first batch (Trainer._step at global_step 0)
    assert sync_counter.by_caller() == Counter({"_record_epoch_loss": 1, "_log": 1, "check_logit_saturation": 1}), \
        sync_counter.calls


@pytest.mark.parametrize("log_every", [1, 2, 3, 4])
def test_logging_steps_are_the_only_syncs(sync_counter, log_every):
    trainer = make_trainer(log_every=log_every)
    result, _ = run_counted(trainer, sync_counter)
    assert result.steps == STEPS
    logs = -(-STEPS // log_every)  # the logging steps, plus the epoch-end flush of a partial window
    assert sync_counter.by_caller() == Counter({"_log": logs, "_record_epoch_loss": 1,
                                                "check_logit_saturation": 1}), sync_counter.calls


@pytest.mark.parametrize("log_every", [4, STEPS + 100])
def test_train_loss_is_logged_every_step_once_and_at_least_once_per_epoch(log_every):
    """A window left open at the epoch's end is logged there (before, a `log_every` above an
    epoch's steps logged no train/loss at all, and the last steps of every epoch were dropped)."""
    losses = []
    base = build_loss("rcssr")

    def recording_loss(logits, labels):
        loss = base(logits, labels)
        losses.append(float(loss.detach()))
        return loss

    trainer = make_trainer(log_every=log_every, loss_fn=recording_loss)
    logged = []
    trainer.accelerator.log = lambda values, step=None: logged.append((step, values))
    result = trainer.train_epoch(random_batches())
    windows = [(4, losses[:4]), (6, losses[4:])] if log_every == 4 else [(6, losses)]
    assert [step for step, _ in logged] == [step for step, _ in windows]
    for (_, values), (_, window) in zip(logged, windows):
        assert values["train/loss"] == pytest.approx(sum(window) / len(window), rel=1e-5)
        assert values["train/images_per_s"] > 0
    assert result.images == 4 * STEPS and result.seconds > 0


def test_counter_sees_a_sync_in_the_step(sync_counter):
    """The wrappers do catch a per-step read (here a loss that logs itself with .item())."""
    base = build_loss("rcssr")

    def chatty_loss(logits, labels):
        loss = base(logits, labels)
        chatty_loss.seen.append(loss.item())
        return loss

    chatty_loss.seen = []
    trainer = make_trainer(log_every=STEPS + 100, loss_fn=chatty_loss)
    run_counted(trainer, sync_counter)
    assert sync_counter.by_caller()["chatty_loss"] == STEPS
    assert len(chatty_loss.seen) == STEPS
