"""cssr-reevaluate (tools/reevaluate.py): the validation-known combinations of the CSSR terms (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from cssr_dist.apps import reevaluate
from cssr_dist.config import dump_yaml, load_config


def test_validation_combinations_by_hand():
    val = {"s0": np.array([1.0, 2.0, 3.0]), "s1": np.array([10.0, 10.0, 40.0])}
    test = {"s0": np.array([2.0, 5.0]), "s1": np.array([10.0, 0.0]), "labels": np.array([0, -1])}
    out = reevaluate.validation_combinations(val, test, ("s0", "s1"))
    std0, std1 = np.std([1, 2, 3]), np.std([10, 10, 40])
    assert out["val_z"] == pytest.approx([0.0 + (10 - 20) / std1, 3 / std0 + (0 - 20) / std1])
    # empirical CDF with +1 smoothing: s0=2 -> (2+1)/4, s1=10 -> (2+1)/4; s0=5 -> 1, s1=0 -> 1/4
    assert out["val_rank"] == pytest.approx([2 * np.log(3 / 4), np.log(1.0) + np.log(1 / 4)])


def test_rank_combination_ignores_a_heavy_tailed_scale():
    """Multiplying a term by 1e6 (as S2's Gram power does) changes neither combination's ranking."""
    rng = np.random.default_rng(0)
    val = {"s0": rng.normal(size=50), "s2": rng.normal(size=50)}
    test = {"s0": rng.normal(size=20), "s2": rng.normal(size=20), "labels": np.zeros(20, dtype=int)}
    scaled = lambda d: {**d, "s2": d["s2"] * 1e6}  # noqa: E731
    a = reevaluate.validation_combinations(val, test, ("s0", "s2"))
    b = reevaluate.validation_combinations(scaled(val), scaled(test), ("s0", "s2"))
    assert np.argsort(a["val_rank"]).tolist() == np.argsort(b["val_rank"]).tolist()
    assert a["val_z"] == pytest.approx(b["val_z"], rel=1e-6)


def _run_folder(tmp_path, protocol: str):
    cfg = load_config("configs/fashion_mnist/rcssr.yaml", [f"eval.protocol={protocol}"])
    run_dir = tmp_path / f"run_{protocol}"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return run_dir


def test_a_variant_the_protocol_overrides_is_refused_not_relabelled(tmp_path, capsys):
    """The reference protocol keeps BatchNorm statistics as trained (eval.recalibrate_bn forced false):
    `--variants recal` on such a run would evaluate `base` again under the name `recal`."""
    reference = load_config("configs/fashion_mnist/rcssr.yaml", ["eval.protocol=reference"])
    clean = load_config("configs/fashion_mnist/rcssr.yaml", ["eval.recalibrate_bn=true"])
    assert reevaluate.protocol_overridden(reference, reevaluate.VARIANTS["recal"]) == [
        "eval.recalibrate_bn=true (eval.protocol=reference sets False)"]
    assert reevaluate.protocol_overridden(reference, reevaluate.VARIANTS["stats_train"]) == []  # it holds
    assert reevaluate.protocol_overridden(clean, reevaluate.VARIANTS["recal"]) == []
    run_dir = _run_folder(tmp_path, "reference")
    assert reevaluate.main([str(run_dir), "--variants", "base", "recal"]) == 2  # before any evaluation
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "eval.recalibrate_bn=true" in err[0]
