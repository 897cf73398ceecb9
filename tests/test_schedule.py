"""Per-iteration learning-rate schedules (paper recipes)."""

import math

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
