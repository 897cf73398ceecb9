"""Per-iteration learning-rate schedules (paper recipes)."""

import math

import numpy as np

import pytest

from cssr_dist.config import ScheduleConfig
from cssr_dist.engine.schedule import lr_factor_fn


def test_multistep_with_warmup_is_per_iteration():
    f = lr_factor_fn(ScheduleConfig(kind="multistep", epochs=235, warmup_epochs=1, milestones=[150, 225]), 10)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == 1.0 and f(1499) == 1.0
    assert f(1500) == pytest.approx(0.1) and f(2249) == pytest.approx(0.1) and f(2250) == pytest.approx(0.01)


def test_cifar_recipe_milestones():
    f = lr_factor_fn(ScheduleConfig(epochs=200, milestones=[120, 190]), 100)
    assert [f(s) for s in (0, 11999, 12000, 18999, 19000)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_cosine_goes_from_one_to_floor():
    f = lr_factor_fn(ScheduleConfig(kind="cosine", epochs=10, warmup_epochs=0, min_lr=0.0), 10)
    assert f(0) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(99))
    assert math.isclose(f(25), 0.5 * (1 + math.cos(math.pi * 0.25)))


# ------------------------------------------------- the reference code's schedule (issue 16)
class _RefWarmUp:
    """The reference's WarmUpLrSchedule, transcribed."""

    def __init__(self, warm_epoch, epoch_tot_steps, init_lr):
        self.ep_steps, self.tgtstep, self.init_lr, self.warm_epoch = epoch_tot_steps, warm_epoch * epoch_tot_steps, init_lr, warm_epoch

    def get_lr(self, epoch, step, lr):
        tstep = epoch * self.ep_steps + step
        if self.tgtstep > 0 and tstep <= self.tgtstep:
            lr = self.init_lr * tstep / self.tgtstep
        return lr


class _RefMultiStep:
    """The reference's MultiStepLrSchedule, transcribed."""

    def __init__(self, milestones, lrdecays, start_lr, warmup):
        self.milestones, self.lrdecays, self.start_lr, self.warmup = milestones, lrdecays, start_lr, warmup

    def get_lr(self, epoch, step, lr):
        lr = self.start_lr
        for m in self.milestones:
            if epoch >= m:
                lr *= self.lrdecays
        return self.warmup.get_lr(epoch, step, lr)


class _RefEpochCosine:
    """The reference's EpochwiseCosineAnnealingLrSchedule, transcribed (stateful)."""

    def __init__(self, startlr, milestones, lrdecay, epoch_num, warmup):
        self.cosine_s, self.cosine_e = 0, 0
        self.lrdecay, self.warmup, self.startlr = lrdecay, warmup, startlr
        self.warmup_epoch = warmup.warm_epoch
        self.ms = [self.warmup_epoch] + milestones + [epoch_num]
        self.ref = {self.ms[i]: self.ms[i + 1] for i in range(len(self.ms) - 1)}

    def get_lr(self, epoch, step, lr):
        lr = self.warmup.get_lr(epoch, step, lr)
        if step != 0:
            return lr
        if epoch in self.ms:
            if epoch != self.warmup_epoch:
                self.startlr *= self.lrdecay
            self.cosine_s = epoch
            self.cosine_e = self.ref[epoch]
        if self.cosine_e > 0:
            lr = self.startlr * (np.cos((epoch - self.cosine_s) / (self.cosine_e - self.cosine_s) * 3.14159) + 1) * 0.5
        return lr


def _reference_curve(kind, lr, warm, milestones, decay, epochs, steps):
    """The rate of every step as the reference's training loop sets it (get_lr before each step)."""
    warmup = _RefWarmUp(warm, steps, lr)
    sched = (_RefMultiStep(milestones, decay, lr, warmup) if kind == "multistep"
             else _RefEpochCosine(lr, list(milestones), decay, epochs, warmup))
    current, out = lr, []
    for epoch in range(epochs):
        for i in range(steps):
            current = sched.get_lr(epoch, i, current)
            out.append(current)
    return out


@pytest.mark.parametrize("kind, warm, milestones, epochs, steps", [
    ("multistep", 1, [3], 4, 7),          # the ImageNet fine-tuning recipe's shape
    ("multistep", 2, [5, 8], 10, 6),
    ("multistep", 0, [12, 19], 20, 4),    # the CIFAR recipe's shape (no warm-up)
    ("cosine", 1, [], 6, 5),
    ("cosine", 2, [5, 8], 11, 3),         # restarts at the milestones, rate x gamma
    ("cosine", 0, [], 5, 4),
    ("cosine", 1, [120, 190], 6, 4),      # milestones after the last epoch: the first cycle is cut
])
def test_reference_formula_follows_the_reference_code_step_by_step(kind, warm, milestones, epochs, steps):
    import torch

    from cssr_dist.engine.schedule import build_scheduler

    cfg = ScheduleConfig(kind=kind, epochs=epochs, warmup_epochs=warm, milestones=milestones, gamma=0.1,
                         formula="reference")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    sched = build_scheduler(opt, cfg, steps)
    ours = []
    for _ in range(epochs * steps):  # the Trainer: the step uses the current rate, then scheduler.step()
        ours.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = _reference_curve(kind, 0.4, warm, milestones, 0.1, epochs, steps)
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if warm:
        assert ours[0] == 0.0 and ours[warm * steps] == pytest.approx(0.4)


def test_reference_formula_rejects_epochs_it_cannot_count():
    from cssr_dist.errors import ConfigError

    with pytest.raises(ConfigError, match="whole epochs"):
        lr_factor_fn(ScheduleConfig(kind="cosine", epochs=3, warmup_epochs=0.5, formula="reference"), 10)
