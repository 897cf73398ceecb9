"""pytorch-ood's post-hoc detectors behind the score registry: every registered detector gives
the scores pytorch-ood's own `fit(loader)` + `predict(images)` give on the same model and
images, for every head it applies to. Parametrised over the registry: a new detector is
tested without new code."""

from __future__ import annotations

import pytest
import torch
from pytorch_ood.detector.openmax.libnotmr import LibNotMR
from safetensors import safe_open
from torch import nn

from cssr_dist.distributed import gather_by_id
from cssr_dist.errors import ConfigError, DataError
from cssr_dist.models.cssr_head import CSSRHead
from cssr_dist.models.linear_head import LinearHead
from cssr_dist.models.losses import build_loss, class_log_probs, loss_kind_for_head
from cssr_dist.models.osr_model import OSRModel
from cssr_dist.scoring import posthoc
from cssr_dist.scoring.scores import SCORE_REGISTRY, Scorer, resolve_baselines
from tests.helpers import launch_train

K, C, SIDE, N_TRAIN, N_TEST, BATCH = 3, 8, 5, 150, 40, 32
HEADS = ("linear", "rcssr")
CASES = [(name, head) for name in posthoc.DETECTORS for head in HEADS if posthoc.applicable(name, head)]


def _model(head_kind: str) -> OSRModel:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, C, 3, padding=1), nn.ReLU())
    head = LinearHead(C, K, gamma=2.0) if head_kind == "linear" else CSSRHead(C, K, latent=4, sign=1, gamma=0.5)
    return OSRModel(backbone, head)


def _data(model: OSRModel) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Three noisy image prototypes as classes; the tiny model is trained briefly on them so
    that it predicts every class (SHE keeps correct predictions only). Returns the training
    batches and test images (the prototypes at another noise level, plus noise)."""
    g = torch.Generator().manual_seed(1)
    protos = torch.rand(K, 1, SIDE, SIDE, generator=g) * 2
    y = torch.arange(N_TRAIN) % K
    x = protos[y] + 0.3 * torch.randn(N_TRAIN, 1, SIDE, SIDE, generator=g)
    loss_fn = build_loss(_kind(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        loss_fn(model(x).logits, y).backward()
        opt.step()
    model.eval()
    batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, N_TRAIN, BATCH)]
    half = N_TEST // 2
    test = torch.cat([protos[torch.arange(half) % K] + 0.5 * torch.randn(half, 1, SIDE, SIDE, generator=g),
                      torch.rand(N_TEST - half, 1, SIDE, SIDE, generator=g) * 2])
    return batches, test


def _kind(model: OSRModel) -> str:
    return "linear" if isinstance(model.head, LinearHead) else "rcssr"


def _reference_parts(model: OSRModel, spec: posthoc.Spec) -> posthoc.Parts:
    """pytorch-ood's model-level inputs: callables on images (its own fit/predict run them)."""
    kind = _kind(model)
    if spec.input == "posterior":
        to_logits = lambda x: class_log_probs(model(x).logits, loss_kind_for_head(kind))  # noqa: E731
    else:
        to_logits = lambda x: model(x).logits.mean(dim=(2, 3))  # noqa: E731
    return posthoc.Parts(K, C, model=to_logits, encoder=lambda x: model(x).features.mean(dim=(2, 3)),
                         backbone=lambda x: model(x).features, head=posthoc.head_logits_fn(model.head),
                         linear=posthoc.linear_view(model.head) if kind == "linear" else None)


@pytest.mark.parametrize("name,head_kind", CASES)
def test_detector_equals_pytorch_ood_predict(name: str, head_kind: str):
    model = _model(head_kind)
    batches, test_images = _data(model)
    spec = posthoc.DETECTORS[name]
    with torch.no_grad():
        reference = spec.build(_reference_parts(model, spec))
        reference.fit(batches)
        expected = -reference.predict(test_images).double()

        scorer = Scorer(head_kind, K, C, "msp" if name != "msp" else "mls", baselines=[name])
        assert scorer.baselines == [name]
        ids = torch.arange(N_TRAIN)

        def outputs():
            for i, (x, y) in enumerate(batches):
                out = model(x)
                yield out.features, out.logits, y, ids[i * BATCH:i * BATCH + len(y)]

        scorer.fit(outputs, lambda t: t, head=model.head)
        out = model(test_images)
        got = scorer(out.features, out.logits)
    assert got[name].dtype == torch.float64 and got[name].shape == (N_TEST,)
    assert torch.isfinite(got[name]).all()
    torch.testing.assert_close(got[name], expected.to(got[name].device), rtol=1e-5, atol=1e-8)


def test_linear_layer_detectors_do_not_apply_to_cssr_heads():
    linear_only = [n for n, s in posthoc.DETECTORS.items() if s.linear]
    assert {"vim", "dice", "fdbd", "she", "nnguide"} <= set(linear_only)
    with pytest.raises(ConfigError, match="'vim' does not apply to rcssr heads"):
        resolve_baselines(["msp", "vim"], "rcssr")
    everything = resolve_baselines("all", "rcssr")
    assert "vim" not in everything and {"react", "knn", "mahalanobis", "s0", "integrated"} <= set(everything)
    assert set(posthoc.DETECTORS) <= set(resolve_baselines("all", "linear"))
    assert "s0" not in resolve_baselines("all", "linear")  # s0 is MSP for the linear head


def test_unknown_baseline_is_one_line_with_the_valid_names():
    with pytest.raises(ConfigError) as err:
        resolve_baselines(["msp", "odin"], "linear")
    text = str(err.value)
    assert "'odin'" in text and "valid: all, s0, msp" in text and "knn" in text and "\n" not in text
    with pytest.raises(ConfigError, match="neither a list"):
        resolve_baselines("everything", "linear")
    assert set(SCORE_REGISTRY) >= set(posthoc.DETECTORS)


def test_default_scorer_computes_todays_three_only():
    model = _model("linear")
    out = model(torch.rand(4, 1, SIDE, SIDE))
    scorer = Scorer("linear", K, C, "msp")
    scorer.fit(lambda: [(out.features, out.logits)], lambda t: t, head=model.head)
    assert set(scorer(out.features, out.logits)) == {"pred", "s0", "msp", "mls", "energy"}


def test_training_sample_is_capped_by_smallest_id_keys():
    sample = posthoc.TrainingSample(cap=10)
    ids = torch.arange(100)
    feats = torch.randn(100, C, 2, 2)
    for i in range(0, 100, 16):
        pooled = posthoc.Pooled(feats[i:i + 16], torch.randn(len(ids[i:i + 16]), K, 2, 2), lambda: torch.zeros(1))
        pooled._cache["posterior"] = torch.zeros(len(ids[i:i + 16]), K)
        sample.add(pooled, ids[i:i + 16] % K, ids[i:i + 16])
    rows, maps = sample.gathered(lambda local: gather_by_id(local, 1), torch.device("cpu"))
    expected = torch.topk(posthoc.sample_keys(ids), 10, largest=False).indices.sort().values
    assert rows["ids"].tolist() == expected.tolist() and maps == {}
    torch.testing.assert_close(rows["features"], feats[expected].mean(dim=(2, 3)))



def test_a_detector_that_cannot_be_fitted_costs_one_warning_not_the_evaluation():
    model = _model("linear")
    out = model(torch.rand(10, 1, SIDE, SIDE))
    scorer = Scorer("linear", K, C, "msp", baselines=["knn", "entropy"])  # k = 50 > 10 training images
    batch = (out.features, out.logits, torch.arange(10) % K, torch.arange(10))
    with pytest.warns(UserWarning, match="post-hoc detector knn not fitted .*k=50"):
        scorer.fit(lambda: [batch], lambda t: t, head=model.head)
    scores = scorer(out.features, out.logits)
    assert "knn" not in scores and scores["entropy"].shape == (10,)
    assert scorer.detectors.not_fitted["knn"].startswith("ValueError: k=50 exceeds")


def test_config_takes_a_list_or_all():
    from cssr_dist.config import load_config

    assert load_config("configs/smoke.yaml", ["eval.baselines=all"]).eval.baselines == "all"
    assert load_config("configs/smoke.yaml").eval.baselines == ["msp", "mls", "energy"]
    with pytest.raises(ConfigError, match="give a list of score names or 'all'"):
        load_config("configs/smoke.yaml", ["eval.baselines=knn"])


def _fitted_on_a_sample(names: list[str], cap: int = 100) -> tuple[OSRModel, posthoc.PosthocDetectors, torch.Tensor]:
    """The RCSSR tiny model's detectors `names` fitted as an evaluation fits them, and test features."""
    model = _model("rcssr")
    batches, test_images = _data(model)
    dets = posthoc.PosthocDetectors(names, "rcssr", K, C, cap=cap, cap_maps=cap)
    sample = dets.new_sample()
    with torch.no_grad():
        for i, (x, y) in enumerate(batches):
            out = model(x)
            log_probs = class_log_probs(out.logits, loss_kind_for_head("rcssr"))
            pooled = posthoc.Pooled(out.features, out.logits, lambda: log_probs)
            sample.add(pooled, y, torch.arange(i * BATCH, i * BATCH + len(y)))
    rows, maps = sample.gathered(lambda local: gather_by_id(local, 1), torch.device("cpu"))
    dets.fit(model.head, rows, maps)
    return model, dets, test_images


def test_stored_sample_refits_the_same_detectors_without_a_training_pass():
    names = ["knn", "mahalanobis", "openmax", "react", "vra"]
    model, dets, test_images = _fitted_on_a_sample(names)
    tensors = dets.sample_tensors()
    assert tensors["maps.maps"].shape == (100, C, SIDE, SIDE) and int(tensors["cap"]) == 100
    again = posthoc.PosthocDetectors(names, "rcssr", K, C, cap=100, cap_maps=100)
    assert again.restore_sample(tensors, "best/weights.safetensors") and again.refit_restored(model.head)
    with torch.no_grad():
        out = model(test_images)
        pooled, fresh = posthoc.Pooled(out.features, out.logits, lambda: torch.zeros(1)), posthoc.Pooled(
            out.features, out.logits, lambda: torch.zeros(1))
        for name in names:
            torch.testing.assert_close(again.score(name, pooled), dets.score(name, fresh), rtol=0, atol=0)
    # another cap in the config: the stored sample is not the one a pass would collect now
    other_cap = posthoc.PosthocDetectors(names, "rcssr", K, C, cap=50, cap_maps=100)
    assert not other_cap.restore_sample(tensors, "x") and not other_cap.refit_restored(model.head)
    assert not posthoc.PosthocDetectors(["entropy"], "rcssr", K, C).restore_sample(tensors, "x")  # needs no data


@pytest.mark.parametrize("attack", ["extra", "missing", "shape", "nan", "key", "label", "cap"])
def test_a_damaged_stored_sample_is_one_line_never_fitted(attack: str):
    _, dets, _ = _fitted_on_a_sample(["knn", "react"])
    tensors = dict(dets.sample_tensors())
    if attack == "extra":
        tensors["rows.payload"] = torch.zeros(3)
    elif attack == "missing":
        del tensors["rows.posterior"]
    elif attack == "shape":
        tensors["rows.features"] = tensors["rows.features"][:, :C - 1]
    elif attack == "nan":
        tensors["maps.maps"] = tensors["maps.maps"].clone()
        tensors["maps.maps"][0, 0, 0, 0] = float("nan")
    elif attack == "key":
        tensors["rows.ids"] = tensors["rows.ids"] + 1  # keys no longer those of the ids
    elif attack == "label":
        tensors["rows.labels"] = tensors["rows.labels"].clone()
        tensors["rows.labels"][0] = K
    else:
        tensors["cap"] = torch.tensor([100.0])
    fresh = posthoc.PosthocDetectors(["knn", "react"], "rcssr", K, C, cap=100, cap_maps=100)
    with pytest.raises(DataError, match=r"^best/weights.safetensors: .*rewrites best/ with a fresh sample$") as err:
        fresh.restore_sample(tensors, "best/weights.safetensors")
    assert "\n" not in str(err.value) and fresh.restored is None


@pytest.mark.slow
@pytest.mark.parametrize("keep", [True, False])
def test_best_keeps_the_detectors_sample_only_when_asked(tmp_path, keep: bool):
    """`eval.posthoc_keep_sample` decides whether the final best/ carries the detectors' training
    sample (ImageNet configs leave it out: ~0.65 GB); either way the weights are there."""
    args = ["--config", "configs/smoke.yaml", "data.train_per_class=40", "data.test_per_class=10",
            "data.stats_per_class=10", "data.batch_size=16", "schedule.epochs=1", "eval.test_interval=0",
            "run.progress=false", "tracking.wandb=false", "eval.baselines=[knn]", f"eval.posthoc_keep_sample={keep}",
            f"run.output_dir={tmp_path / 'runs'}", "run.name=keep"]
    out = launch_train(tmp_path, args, processes=1)
    assert out.returncode == 0, out.stderr[-3000:]
    names = safe_open(str(tmp_path / "runs" / "keep" / "checkpoints" / "best" / "weights.safetensors"), "pt").keys()
    assert any(n.startswith("model.") for n in names)
    assert any(n.startswith("posthoc.rows.") for n in names) == keep


MAP_DETECTORS = [n for n, s in posthoc.DETECTORS.items() if s.input == "maps"]


def test_map_detectors_score_row_slices_in_parallel_with_the_scores_of_one_call(monkeypatch):
    """On the CPU each feature-map detector scores one slice of rows per intra-op thread (in
    threads, one intra-op thread each) and the scores are those of one call on the whole batch;
    the process's thread setting is left as it was."""
    model, dets, images = _fitted_on_a_sample(MAP_DETECTORS)
    with torch.no_grad():
        out = model(images)
    pooled = posthoc.Pooled(out.features, out.logits, lambda: torch.zeros(1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one intra-op thread: one call on the whole batch
        whole = {name: dets.score(name, pooled) for name in MAP_DETECTORS}
        seen: list[tuple[int, int]] = []
        real = posthoc.rows_in_parallel

        def spy(predict, maps, rows=posthoc.HEAD_ROWS_CPU):
            def recorded(part):
                seen.append((len(part), torch.get_num_threads()))
                return predict(part)
            return real(recorded, maps, rows)

        monkeypatch.setattr(posthoc, "rows_in_parallel", spy)
        torch.set_num_threads(2)
        sliced = {name: dets.score(name, pooled) for name in MAP_DETECTORS}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    # 40 rows over 2 threads: slices start at multiples of the head's 32 rows -> 32 + 8
    assert sorted(seen) == sorted([(32, 1), (8, 1)] * len(MAP_DETECTORS))
    for name in MAP_DETECTORS:
        torch.testing.assert_close(sliced[name], whole[name], rtol=1e-6, atol=1e-9)


def test_openmax_asks_scipy_once_per_class_and_batch(monkeypatch):
    """pytorch-ood's OpenMax loop asks one w_score per row and top class; every one must come
    from the batch's table (one vectorised call per class), also for a class that is no row's
    argmax (predict leaves its distance at 0)."""
    model, dets, images = _fitted_on_a_sample(["openmax"])
    with torch.no_grad():
        out = model(images)
    logits = out.logits.clone()
    logits[:, 0] -= 100.0  # class 0 is no row's argmax
    calls: list[int] = []
    real = LibNotMR.w_score
    monkeypatch.setattr(LibNotMR, "w_score", lambda self, x: calls.append(int(torch.as_tensor(x).numel())) or
                        real(self, x))
    got = dets.score("openmax", posthoc.Pooled(out.features, logits, lambda: torch.zeros(1)))
    assert torch.isfinite(got).all()
    assert len(calls) == K and all(n > 1 for n in calls)  # one table per class, no scalar call
