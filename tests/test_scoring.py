"""Scores and ScoreStatistics against straightforward per-sample / per-class float64 loops."""

from __future__ import annotations

import io
import math
import threading

import numpy as np
import pytest
import torch

from cssr_dist.errors import ConfigError
from cssr_dist.scoring import scores as S
from cssr_dist.scoring.statistics import ScoreStatistics, gram_matrix

K, C, H, W = 3, 5, 2, 3


def _batch(seed: int, b: int = 8, k: int = K, c: int = C, h: int = H, w: int = W):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, c, h, w, generator=g)
    logits = torch.randn(b, k, h, w, generator=g) * 2.0
    return feats, logits


def _loop_gram(x: torch.Tensor, p: int = 8) -> torch.Tensor:
    """One sample [C,H,W] -> [C,C], the formula written out in float64 without rescaling."""
    xf = x.double().reshape(x.shape[0], -1)
    m = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        for j in range(x.shape[0]):
            m[i, j] = torch.sum(xf[i] ** p * xf[j] ** p)
    return m.sign() * m.abs() ** (1.0 / p)


def _loop_stats(feats: torch.Tensor, preds: torch.Tensor, k: int = K):
    c = feats.shape[1]
    proto_sum = torch.zeros(k, c, dtype=torch.float64)
    count = torch.zeros(k, dtype=torch.float64)
    gram_sum = torch.zeros(k, c, c, dtype=torch.float64)
    for x, y in zip(feats, preds.tolist()):
        proto_sum[y] += x.double().abs().mean(dim=(1, 2))
        gram_sum[y] += _loop_gram(x)
        count[y] += 1
    return proto_sum, count, gram_sum


# ----------------------------------------------------------------------------- Gram
def test_gram_matrix_matches_loop_and_guards_overflow():
    feats, _ = _batch(0, b=3)
    g = gram_matrix(feats)
    assert g.dtype == torch.float64 and g.shape == (3, C, C)
    for b in range(3):
        torch.testing.assert_close(g[b], _loop_gram(feats[b]), rtol=1e-10, atol=1e-12)
    big = (feats * 1e4).float()  # x^8 ~ 1e32 per entry: the float32 product overflows
    naive32 = big.flatten(2).pow(8) @ big.flatten(2).pow(8).transpose(1, 2)
    assert not torch.isfinite(naive32).all()
    gb = gram_matrix(big)
    assert torch.isfinite(gb).all()
    torch.testing.assert_close(gb, gram_matrix(feats) * 1e8, rtol=1e-6, atol=0)
    assert torch.equal(gram_matrix(torch.zeros(2, C, H, W)), torch.zeros(2, C, C, dtype=torch.float64))


@pytest.mark.parametrize("power", [1, 2, 3, 5])
def test_gram_matrix_other_powers_keep_sign(power):
    feats, _ = _batch(11, b=2)
    g = gram_matrix(feats, power)
    for b in range(2):
        torch.testing.assert_close(g[b], _loop_gram(feats[b], power), rtol=1e-10, atol=1e-12)
    if power % 2:
        assert (g < 0).any()  # odd powers keep negative correlations


# ----------------------------------------------------------------------------- statistics
def test_update_class_stats_matches_per_class_loop():
    feats, logits = _batch(1, b=10)
    preds = torch.tensor([0, 2, 2, 0, 2, 0, 0, 2, 2, 0])  # class 1 never predicted
    st = ScoreStatistics(K, C)
    st.update_class_stats(feats[:6], preds[:6])
    st.update_class_stats(feats[6:].half(), preds[6:])  # dtype of features does not matter
    ps, cnt, gs = _loop_stats(torch.cat([feats[:6], feats[6:].half().float()]), preds)
    torch.testing.assert_close(st.proto_sum, ps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.proto_count, cnt)
    torch.testing.assert_close(st.gram_count, cnt)
    torch.testing.assert_close(st.gram_sum, gs, rtol=1e-10, atol=1e-10)
    u = st.prototypes()
    mean_abs = ps / cnt.clamp_min(1).unsqueeze(1)
    torch.testing.assert_close(u, mean_abs / mean_abs.sum(0, keepdim=True))
    assert torch.equal(u[1], torch.zeros(C, dtype=torch.float64))
    torch.testing.assert_close(u.sum(0), torch.ones(C, dtype=torch.float64))
    torch.testing.assert_close(st.gram_means()[2], gs[2] / cnt[2])
    assert st.class_stats_ready and not st.moments_ready and not st.ready


def test_zstats_match_numpy():
    rng = np.random.default_rng(0)
    vals = {n: rng.normal(loc=i * 10.0, scale=i + 1.0, size=50) for i, n in enumerate(("s0", "s1", "s2"))}
    st = ScoreStatistics(K, C, use_gram=False, score_names=("s0", "s1", "s2"))
    assert math.isnan(st.zstats("s0")[0].item())
    for lo in range(0, 50, 16):
        st.update_moments({n: torch.from_numpy(v[lo : lo + 16]) for n, v in vals.items()})
    for n, v in vals.items():
        mean, std = st.zstats(n)
        assert mean.item() == pytest.approx(v.mean(), rel=1e-12)
        assert std.item() == pytest.approx(v.std(), rel=1e-9)
    assert st.moments_ready
    with pytest.raises(KeyError, match="s2"):
        st.update_moments({"s0": torch.zeros(2), "s1": torch.zeros(2)})


def _fake_all_reduce_sum(world: int):
    """reduce_fn per rank that sums a tensor over `world` threads, like all_reduce(SUM)."""
    barrier = threading.Barrier(world)
    slots: list = [None] * world

    def make(rank: int):
        def fn(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            total = sum(slots[1:], slots[0].clone())
            barrier.wait()
            return total

        return fn

    return [make(r) for r in range(world)]


def test_reduce_two_ranks_equals_single_process():
    feats, logits = _batch(2, b=12)
    preds = S.Scorer("rcssr", K, C, "s0").classify(logits)
    raw = S.compute_scores("rcssr", feats, logits)
    moments = {"s0": raw["s0"], "s1": raw["mls"], "s2": raw["energy"]}  # any three [B] scores

    single = ScoreStatistics(K, C)
    single.update_class_stats(feats, preds)
    single.update_moments(moments)

    ranks = [ScoreStatistics(K, C) for _ in range(2)]
    parts = [slice(0, 5), slice(5, 12)]  # unequal shards: the reduction must be count-weighted
    for st, sl in zip(ranks, parts):
        st.update_class_stats(feats[sl], preds[sl])
        st.update_moments({n: v[sl] for n, v in moments.items()})
    fns = _fake_all_reduce_sum(2)
    threads = [threading.Thread(target=st.reduce_, args=(fn,)) for st, fn in zip(ranks, fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    for st in ranks:
        for name, buf in single.named_buffers():
            torch.testing.assert_close(getattr(st, name), buf, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st.prototypes(), single.prototypes())
        torch.testing.assert_close(st.gram_means(), single.gram_means())
        for n in single.score_names:
            torch.testing.assert_close(torch.stack(st.zstats(n)), torch.stack(single.zstats(n)))

    # reducing twice (e.g. once per pass with which="all") scales sums and counts alike
    st = ranks[0]
    st.reduce_(lambda t: 2 * t)
    assert torch.equal(st.proto_count, 2 * single.proto_count)
    torch.testing.assert_close(st.prototypes(), single.prototypes())
    torch.testing.assert_close(torch.stack(st.zstats("s0")), torch.stack(single.zstats("s0")))
    st.reduce_(lambda t: 3 * t, which="moments")
    assert torch.equal(st.proto_count, 2 * single.proto_count)
    assert torch.equal(st.moments[:, 0], 6 * single.moments[:, 0])
    with pytest.raises(ValueError, match="shape"):
        st.reduce_(lambda t: t.sum())


def test_state_dict_round_trip_and_dtype_kept():
    feats, logits = _batch(3)
    st = ScoreStatistics(K, C)
    st.update_class_stats(feats, S.Scorer("pcssr", K, C, "s0").classify(logits))
    st.update_moments(S.compute_scores("pcssr", feats, logits, st))
    buf = io.BytesIO()
    torch.save(st.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert set(sd) == {"proto_sum", "proto_count", "gram_sum", "gram_count", "moments"}
    restored = ScoreStatistics(K, C)
    assert not restored.class_stats_ready
    restored.load_state_dict(sd)
    assert restored.ready
    a = S.compute_scores("pcssr", feats, logits, st)
    b = S.compute_scores("pcssr", feats, logits, restored)
    assert a.keys() == b.keys() and "integrated" in a
    for k in a:
        assert torch.equal(a[k], b[k])
    no_gram = ScoreStatistics(K, C, use_gram=False)
    assert set(no_gram.state_dict()) == {"proto_sum", "proto_count", "moments"}
    with pytest.raises(RuntimeError):
        no_gram.load_state_dict(sd)  # a Gram checkpoint does not silently load into a no-Gram model
    st.half()
    assert all(b.dtype == torch.float64 for b in st.buffers())


def test_reset():
    feats, logits = _batch(4)
    st = ScoreStatistics(K, C, use_gram=False)
    st.update_class_stats(feats, S.Scorer("rcssr", K, C, "s0").classify(logits))
    st.update_moments({n: torch.ones(8) for n in st.score_names})
    st.reset_("class")
    assert not st.class_stats_ready and st.moments_ready
    st.reset_()
    assert not st.moments_ready


# ----------------------------------------------------------------------------- scores
def _loop_log_pbar(kind: str, z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    if kind == "linear":
        return torch.log_softmax(z.mean(dim=(1, 2)), dim=0)
    return torch.log(torch.softmax(z, dim=0).mean(dim=(1, 2)))


@pytest.mark.parametrize("kind", ["linear", "pcssr", "rcssr"])
def test_head_scores_match_per_sample_loops(kind):
    feats, logits = _batch(5)
    out = S.compute_scores(kind, feats, logits)
    assert set(out) == {"pred", "s0", "msp", "mls", "energy"}
    for b in range(feats.shape[0]):
        x, z = feats[b].double(), logits[b].double()
        lp = _loop_log_pbar(kind, z)
        pred = int(lp.argmax())
        assert int(out["pred"][b]) == pred
        assert out["msp"][b].item() == pytest.approx(lp.exp().max().item(), rel=1e-5)
        zbar = z.mean(dim=(1, 2))
        assert out["mls"][b].item() == pytest.approx(zbar.max().item(), rel=1e-5)
        assert out["energy"][b].item() == pytest.approx(torch.logsumexp(zbar, 0).item(), rel=1e-5)
        if kind == "linear":
            expected = lp.exp().max().item()
        elif kind == "rcssr":
            expected = z[pred].mean().item()
        else:
            m = x.abs().mean(dim=0) + S.PCSSR_EPS
            expected = sum(z[pred, i, j] / m[i, j] ** 2 for i in range(H) for j in range(W)).item() / (H * W)
        assert out["s0"][b].item() == pytest.approx(expected, rel=1e-5)
        assert out["s0"].dtype == torch.float64


def test_msp_is_stable_for_large_logits():
    logits = torch.full((2, K, H, W), -100.0)
    logits[:, 1] = 100.0
    assert torch.allclose(S.msp("pcssr", logits), torch.ones(2, dtype=torch.float64))
    assert S.Scorer("pcssr", K, C, "msp").classify(logits).tolist() == [1, 1]


def test_scorer_fits_only_what_its_primary_score_needs():
    feats, logits = _batch(3, b=8)
    batches = lambda: [(feats, logits)]  # noqa: E731
    plain = S.Scorer("rcssr", K, C, "s0")
    plain.fit(batches, lambda t: t)
    assert not plain.stats.class_stats_ready and set(plain(feats, logits)) == {"pred", "s0", "msp", "mls", "energy"}
    full = S.Scorer("rcssr", K, C, "integrated")
    full.fit(batches, lambda t: t)
    scores = full(feats, logits)
    assert {"s1", "s2", "integrated"} <= set(scores) and scores["integrated"].shape == (8,)
    assert S.primary_score("linear", "cssr", "auto") == "msp" and S.primary_score("rcssr", "cssr_ft", "auto") == "s0"
    with pytest.raises(ConfigError, match="score 'nope' is unknown"):
        S.primary_score("rcssr", "cssr", "nope")


def test_pcssr_s0_finite_for_all_zero_features():
    feats = torch.zeros(4, C, H, W)
    _, logits = _batch(6, b=4)
    s = S.s0("pcssr", feats, -logits.abs())
    assert torch.isfinite(s).all() and (s < 0).all()
    assert torch.equal(S.s0("pcssr", feats, torch.zeros(4, K, H, W)), torch.zeros(4, dtype=torch.float64))


def test_s1_s2_integrated_match_loops():
    train_f, train_z = _batch(7, b=20)
    st = ScoreStatistics(K, C)
    st.update_class_stats(train_f, S.Scorer("rcssr", K, C, "s0").classify(train_z))
    train_scores = S.compute_scores("rcssr", train_f, train_z, st)
    assert {"s1", "s2"} <= set(train_scores) and "integrated" not in train_scores
    st.update_moments(train_scores)

    feats, logits = _batch(8)
    out = S.compute_scores("rcssr", feats, logits, st)
    u, gm = st.prototypes(), st.gram_means()
    for b in range(feats.shape[0]):
        p = int(out["pred"][b])
        x = feats[b].double()
        s1 = (u[p].view(C, 1, 1) * x).mean().item()
        s2 = (_loop_gram(feats[b]) * gm[p]).sum().item()
        assert out["s1"][b].item() == pytest.approx(s1, rel=1e-9, abs=1e-12)
        assert out["s2"][b].item() == pytest.approx(s2, rel=1e-9)
        zsum = 0.0
        for n, v in (("s0", out["s0"][b].item()), ("s1", s1), ("s2", s2)):
            ref = train_scores[n].numpy()
            zsum += (v - ref.mean()) / (ref.std() + 1e-8)
        assert out["integrated"][b].item() == pytest.approx(zsum, rel=1e-7, abs=1e-9)


def test_no_gram_integrates_s0_s1():
    feats, logits = _batch(9)
    st = ScoreStatistics(K, C, use_gram=False)
    assert st.score_names == ("s0", "s1")
    st.update_class_stats(feats, S.Scorer("pcssr", K, C, "s0").classify(logits))
    st.update_moments(S.compute_scores("pcssr", feats, logits, st))
    out = S.compute_scores("pcssr", feats, logits, st)
    assert "s2" not in out and "integrated" in out
    z = [(out[n] - out[n].mean()) / (out[n].std(unbiased=False) + 1e-8) for n in ("s0", "s1")]
    torch.testing.assert_close(out["integrated"], z[0] + z[1])


def test_registry_errors_and_plugins():
    feats, logits = _batch(10)
    with pytest.raises(ConfigError, match="available"):
        S.compute_scores("rcssr", feats, logits, names=["nope"])
    with pytest.raises(ConfigError, match="head kind"):
        S.compute_scores("cssr", feats, logits)
    with pytest.raises(ConfigError, match="statistics"):
        S.compute_scores("rcssr", feats, logits, ScoreStatistics(K, C), names=["s1"])
    assert set(S.compute_scores("rcssr", feats, logits, names=["mls"])) == {"pred", "mls"}

    @S.register_score("neg_mls_test")
    def _neg(ctx):
        return -ctx.get("mls")

    try:
        out = S.compute_scores("rcssr", feats, logits)
        assert torch.equal(out["neg_mls_test"], -out["mls"])
        with pytest.raises(ValueError, match="already"):
            S.register_score("neg_mls_test")(_neg)
    finally:
        del S.SCORE_REGISTRY["neg_mls_test"]


def test_fit_takes_the_moments_from_other_images_when_given():
    """The reference protocol: class statistics from one pass, z-norm moments from another."""
    plain, augmented = [_batch(20 + i, b=8) for i in range(2)], [_batch(40 + i, b=8) for i in range(3)]
    scorer = S.Scorer("rcssr", K, C, "integrated")
    scorer.fit(lambda: plain, lambda t: t, moment_outputs=lambda: augmented)
    expected = ScoreStatistics(K, C)
    for f, z in plain:
        expected.update_class_stats(f, scorer.classify(z))
    for f, z in augmented:
        raw = S.compute_scores("rcssr", f, z, expected)
        expected.update_moments({n: raw[n] for n in expected.score_names})
    for name, buf in expected.state_dict().items():
        torch.testing.assert_close(scorer.stats.state_dict()[name], buf, rtol=0, atol=0)
    assert scorer.stats.moments[0, 0] == 24  # three augmented batches of 8, not the two plain ones
    same = S.Scorer("rcssr", K, C, "integrated")
    same.fit(lambda: plain, lambda t: t)  # default: both passes on the same images
    torch.testing.assert_close(same.stats.proto_sum, scorer.stats.proto_sum, rtol=0, atol=0)
    assert same.stats.moments[0, 0] == 16
