"""Agreement with the CSSR reference code, pinned as numbers (docs/reference_agreement.md).

The numbers written out below were produced by the REFERENCE implementation (its WRN,
CIFAR ResNet, CSSR head, softmax-average loss, score and metric code) on the weights and
batches that the helpers in this file build; the reference code itself is not part of the
project. The same helpers build the project's models here, so the project must reproduce
the reference's numbers. A drift in the project's math (an activation slope, a BatchNorm
momentum, the layer order, the head's error, the loss's pooling, a score or a metric
definition, the augmentation pool) fails a test.

The network tests run in float64, so they test the math, not the rounding of one machine's
BLAS; the score tests run in float32, the precision of the evaluation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cssr_dist.models import CSSRHead
from cssr_dist.models.backbones import build_backbone
from cssr_dist.models.losses import softmax_avg_loss
from cssr_dist.models.osr_model import OSRModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_CLASSES = 6
LABELS = (0, 5, 2, 3)
TOL = 1e-5


def seeded_state(model: nn.Module, seed: int) -> None:
    """Overwrite every floating tensor of `model` (parameters AND BatchNorm buffers) from one generator.

    Independent of any init code, so that the reference's network can be given exactly the
    same weights by name: conv / head weights ~ N(0, 2 / fan_in) (fan_in = all but the first
    axis of a conv, the last axis of a batched head weight), BN weight 1 + N(0, 0.1^2), bias
    and running mean N(0, 0.1^2), running variance U(0.5, 1.5). Values are drawn in float32
    and then copied, so a float64 model holds exactly the float32 model's weights.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            shape = t.shape
            if name.endswith("running_var"):
                value = 0.5 + torch.rand(shape, generator=gen)
            elif name.endswith(("running_mean", "bias")):
                value = 0.1 * torch.randn(shape, generator=gen)
            elif t.ndim == 1:  # BN weight
                value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            else:
                fan_in = shape[-1] if t.ndim == 3 else math.prod(shape[1:])
                value = torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)
            t.copy_(value)


def seeded_batch(seed: int, n: int = len(LABELS), size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 batch [n, 3, size, size] ~ N(0, 1) and its labels (LABELS)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen), torch.tensor(LABELS[:n])


@torch.no_grad()
def calibrate_bn(model: nn.Module, images: torch.Tensor) -> None:
    """Running statistics := the moments of `images` (random running statistics would send
    the eval-mode features far off and every logit to the clamp, where nothing can be compared)."""
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly its moments
    was_training = model.training
    model.train()
    model(images)
    model.train(was_training)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum


@torch.no_grad()
def roll_classes(model: OSRModel, shift: int) -> OSRModel:
    """Renumber the head's classes (k -> k + shift mod K). The scoring tests use it so that class 0 is
    predicted on the statistics images: the reference skips S1 and S2 altogether (zeros) when it is not."""
    for weights in (*model.head.encoders, *model.head.decoders):
        weights.copy_(torch.roll(weights, shift, dims=0))
    return model


def agreement_model(backbone: str, head: str) -> OSRModel:
    """backbone (wrn28_2 | cifar_resnet18) + an RCSSR / PCSSR head as the reference's CIFAR configs build it
    (latent 64, gamma 0.1, L1, clamp 100, no hidden layer, no projection): `seeded_state(., 0)`, then
    BatchNorm statistics of `seeded_batch(2)`."""
    net = build_backbone(backbone, False, None, in_chans=3)
    model = OSRModel(net, CSSRHead(net.num_features, NUM_CLASSES, latent=64, gamma=0.1,
                                   sign=-1 if head == "pcssr" else 1, distance="l1", clamp=100.0))
    seeded_state(model, 0)
    calibrate_bn(model, seeded_batch(2)[0])
    return model


# --------------------------------------------------------------------------- augmentation: what PIL is asked to do
class PilOpRecorder:
    """Records the PIL operations (and their parameters) an augmentation asks for, image by image.

    Both the project's pool and the reference's call the same PIL functions, so their
    distributions of (operation, magnitude) can be compared without comparing pixels or
    random number generators. Only the outermost call counts (Image.rotate calls transform).
    The identity op calls nothing and shows as a missing op.
    """

    def __init__(self) -> None:
        self.ops: list[tuple] = []
        self._depth = 0
        self._saved: list[tuple] = []

    def _wrap(self, owner: object, name: str, describe) -> None:
        original = getattr(owner, name)
        recorder = self

        def patched(*args, **kwargs):
            if recorder._depth == 0:
                recorder.ops.append(describe(*args, **kwargs))
            recorder._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                recorder._depth -= 1

        self._saved.append((owner, name, original))
        setattr(owner, name, patched)

    def __enter__(self) -> "PilOpRecorder":
        from PIL import Image, ImageDraw, ImageEnhance, ImageOps

        def affine(img, size, method, data=None, *a, **k):
            return ("shear_x", round(data[1], 6)) if data[1] != 0 else ("shear_y", round(data[3], 6))

        self._wrap(ImageEnhance._Enhance, "enhance", lambda enh, factor: (type(enh).__name__.lower(), round(factor, 6)))
        self._wrap(Image.Image, "rotate", lambda img, angle, *a, **k: ("rotate", round(float(angle), 6)))
        self._wrap(Image.Image, "transform", affine)
        self._wrap(ImageOps, "posterize", lambda img, bits: ("posterize", bits))
        self._wrap(ImageOps, "solarize", lambda img, threshold=128: ("solarize", threshold))
        self._wrap(ImageOps, "equalize", lambda img, *a, **k: ("equalize", 0))
        self._wrap(ImageDraw.ImageDraw, "rectangle", lambda d, xy, *a, **k: ("cutout", *map(int, xy)))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


def record_augment(augment, draws: int, size: int = 32) -> list[tuple]:
    """One tuple of recorded PIL operations per augmented image (the cutout last)."""
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    per_image = []
    with PilOpRecorder() as rec:
        for _ in range(draws):
            rec.ops = []
            augment(img)
            per_image.append(tuple(rec.ops))
    return per_image


# --------------------------------------------------------------------------- 1. networks, heads, loss
# From the reference's backbones + CSSR head + CSSRCriterion("softmax_avg") holding `agreement_model`'s weights,
# float64, batch `seeded_batch(1)`: loss, pixel-mean logits of image 0, gradient norms (a head tensor: over
# all K class auto-encoders), and the sum of the last BatchNorm's running mean after the training-mode forward.
REFERENCE_NETWORK = {
    ("wrn28_2", "rcssr", "train"): dict(
        loss=1.9127498059842987,
        logits0=[11.910547165225, 11.953446354407, 11.340214651468, 11.589808541776, 11.518386066297, 11.308923117112],
        grad_norms={"backbone.model.conv1.weight": 0.5955515106223537, "backbone.model.bn1.weight": 0.11849862235373138,
                    "head.encoders.0": 0.9246346040888553, "head.decoders.0": 0.5444069560547145},
        last_bn_running_mean_sum=-15.526923275159008),
    ("wrn28_2", "rcssr", "eval"): dict(
        loss=1.932625529510742,
        logits0=[12.217775448896, 12.297280840672, 11.677273415376, 11.928006749876, 11.903588766724, 11.668957018298],
        grad_norms={"backbone.model.conv1.weight": 0.6499936055041223, "backbone.model.bn1.weight": 0.12073128141887948,
                    "head.encoders.0": 0.9818329655625418, "head.decoders.0": 0.5769749914252347}),
    ("wrn28_2", "pcssr", "train"): dict(
        loss=1.7815073261700864,
        logits0=[-11.910547165225, -11.953446354407, -11.340214651468, -11.589808541776, -11.518386066297,
                 -11.308923117112],
        grad_norms={"backbone.model.conv1.weight": 0.6060222602176523, "backbone.model.bn1.weight": 0.10476868133362677,
                    "head.encoders.0": 0.7854704900418242, "head.decoders.0": 0.4532415106674696},
        last_bn_running_mean_sum=-15.526923275159008),
    ("wrn28_2", "pcssr", "eval"): dict(
        loss=1.7604504830147976,
        logits0=[-12.217775448896, -12.297280840672, -11.677273415376, -11.928006749876, -11.903588766724,
                 -11.668957018298],
        grad_norms={"backbone.model.conv1.weight": 0.663064668566465, "backbone.model.bn1.weight": 0.10767667101193856,
                    "head.encoders.0": 0.8002406469923181, "head.decoders.0": 0.4634100929893543}),
    ("cifar_resnet18", "rcssr", "train"): dict(
        loss=1.8987657424626794,
        logits0=[67.559456169823, 66.824063557602, 70.118387618198, 69.020146800978, 67.661534262159, 68.348320850063],
        grad_norms={"backbone.model.conv1.weight": 11.925905806259458,
                    "backbone.model.layer4.1.bn2.weight": 0.3361799272838127,
                    "head.encoders.0": 8.513891713505782, "head.decoders.0": 1.8373336064467694},
        last_bn_running_mean_sum=-9.978197001121453),
    ("cifar_resnet18", "rcssr", "eval"): dict(
        loss=1.737911665090414,
        logits0=[71.32996040844, 70.090871139775, 73.260998957781, 72.379697585171, 71.317250018692, 71.894614668184],
        grad_norms={"backbone.model.conv1.weight": 11.006867429178396,
                    "backbone.model.layer4.1.bn2.weight": 0.30046242214335905,
                    "head.encoders.0": 8.188293305688394, "head.decoders.0": 1.7621817124629267}),
    ("cifar_resnet18", "pcssr", "train"): dict(
        loss=1.8390871892684215,
        logits0=[-67.559456169823, -66.824063557602, -70.118387618198, -69.020146800978, -67.661534262159,
                 -68.348320850063],
        grad_norms={"backbone.model.conv1.weight": 10.695073133021364,
                    "backbone.model.layer4.1.bn2.weight": 0.3025547431132942,
                    "head.encoders.0": 8.303811813556385, "head.decoders.0": 1.8047896115004904},
        last_bn_running_mean_sum=-9.978197001121453),
    ("cifar_resnet18", "pcssr", "eval"): dict(
        loss=2.0386912923140237,
        logits0=[-71.32996040844, -70.090871139775, -73.260998957781, -72.379697585171, -71.317250018692,
                 -71.894614668184],
        grad_norms={"backbone.model.conv1.weight": 12.303772011954345,
                    "backbone.model.layer4.1.bn2.weight": 0.3630458144539498,
                    "head.encoders.0": 9.82740541563279, "head.decoders.0": 2.1588502955977558}),
}


def _close(actual: float, expected: float, what: str) -> None:
    assert abs(actual - expected) <= TOL * max(1.0, abs(expected)), f"{what}: project {actual!r}, reference {expected!r}"


@pytest.mark.parametrize("backbone,head,mode", sorted(REFERENCE_NETWORK), ids=lambda v: str(v))
def test_network_reproduces_reference_numbers(backbone: str, head: str, mode: str) -> None:
    expected = REFERENCE_NETWORK[(backbone, head, mode)]
    model = agreement_model(backbone, head).double().train(mode == "train")
    images, labels = seeded_batch(1)
    out = model(images.double())
    loss = softmax_avg_loss(out.logits, labels)
    loss.backward()
    _close(loss.item(), expected["loss"], "loss")
    for k, (got, want) in enumerate(zip(out.logits[0].mean((1, 2)).tolist(), expected["logits0"])):
        _close(got, want, f"pixel-mean logit of class {k}")
    params = dict(model.named_parameters())
    for name, want in expected["grad_norms"].items():
        _close(params[name].grad.norm().item(), want, f"gradient norm of {name}")
    if mode == "train":  # the BatchNorm momentum (WRN 0.001, ResNet 0.1) moved the running mean by this much
        last_bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][-1]
        _close(last_bn.running_mean.sum().item(), expected["last_bn_running_mean_sum"], "last BN running mean")


# --------------------------------------------------------------------------- 2. scores and metrics
def score_sets() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """16-image sets A (class statistics), B (z-normalisation moments), C (scored), all seeded."""
    return tuple(torch.cat([seeded_batch(s + 100 * j)[0] for j in range(4)]) for s in (10, 11, 12))


# The reference's CSSRMethod.knownpred_unknwonscore_test / scoring (its class statistics from A, its
# z-normalisation moments from B) and metrics.OSREvaluation on C, float32, WRN-28-2, `agreement_model` with
# `roll_classes(shift)`; `labels` are C's labels (-1 unknown; the lowest integrated score is a known image).
REFERENCE_SCORES = {
    "rcssr": dict(
        shift=-1, labels=[-1, 5, 0, -1, -1, -1, 5, 0, -1, -1, 5, -1, 1, 0, 0, 0],
        pred=[5, 5, 0, 5, 0, 5, 5, 0, 5, 0, 5, 0, 0, 5, 0, 5],
        s0=[11.648582458496094, 11.849020004272461, 11.713811874389648, 12.01793384552002],
        s1=[0.1813702303916216, 0.18863476440310478, 0.18095369613729417, 0.18827709194738418],
        s2=[131786.21875, 144543.234375, 136920.1875, 151460.109375],
        integrated=[-5.544532907076515, -1.2370099137444894, -4.580927737462043, 0.5109393685309821],
        metrics=dict(closed_acc=0.6666666666666666, auroc=0.7619047619047619, aupr_in_trapz=0.8472472743306076,
                     aupr_out_trapz=0.5822433518862089, fpr95_known_pos_closest=1.0, oscr=0.46031746031746035)),
    "pcssr": dict(
        shift=-2, labels=[-1, 1, 0, 0, -1, -1, 0, -1, -1, -1, 0, 3, 1, 1, 3, -1],
        pred=[0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 3, 0, 0, 3, 0],
        s0=[-59.88404083251953, -58.69490051269531, -57.206077575683594, -56.46803665161133],
        s1=[0.17919498274568468, 0.18618615181185305, 0.18090929463505745, 0.18683033459819853],
        s2=[129416.59375, 142363.625, 134797.21875, 149603.1875],
        integrated=[-5.850308689402393, -1.845698566702106, -3.4623328041276933, 0.3690825737715353],
        metrics=dict(closed_acc=0.6666666666666666, auroc=0.7619047619047619, aupr_in_trapz=0.8472472743306076,
                     aupr_out_trapz=0.5822433518862089, fpr95_known_pos_closest=1.0, oscr=0.46031746031746035)),
}


@pytest.mark.parametrize("head", sorted(REFERENCE_SCORES))
@torch.no_grad()
def test_scores_and_reference_metrics_reproduce_reference_numbers(head: str) -> None:
    from cssr_dist.eval.metrics import protocol_metrics
    from cssr_dist.scoring.scores import Scorer

    expected = REFERENCE_SCORES[head]
    model = roll_classes(agreement_model("wrn28_2", head).eval(), expected["shift"])
    set_a, set_b, set_c = score_sets()
    scorer = Scorer(head, NUM_CLASSES, model.head.feature_dim, "integrated")
    passes = iter([set_a, set_b])  # class statistics from A, moments from B, as the reference's two passes

    def outputs():
        yield tuple(model(next(passes)))

    scorer.fit(outputs, reduce=lambda t: t)
    scores = {k: v.numpy() for k, v in scorer(*model(set_c)).items()}
    assert scores["pred"].tolist() == expected["pred"]
    for name in ("s0", "s1", "s2", "integrated"):
        want = np.asarray(expected[name])
        np.testing.assert_allclose(scores[name][:4], want, rtol=TOL, atol=TOL * np.abs(want).max(), err_msg=name)
    got = protocol_metrics(scores["integrated"], scores["pred"], np.asarray(expected["labels"]), NUM_CLASSES,
                           "reference")
    names = {"oscr": "oscr_to_1"}  # the reference protocol reports the reference code's OSCR under this name
    for key, want in expected["metrics"].items():
        assert got[names.get(key, key)] == pytest.approx(want, abs=1e-9), key


# --------------------------------------------------------------------------- 3. the strong augmentation
# The reference's pool (its HighlyCustomizableAugment with basic.json's pool) as what PIL is asked to do: for
# v = 1..9 the magnitude each op passes to PIL. Signed ops (rotate, shears) flip the sign with probability 1/2.
REFERENCE_MAGNITUDES = {
    "brightness": [0.28, 0.46, 0.64, 0.82, 1.0, 1.18, 1.36, 1.54, 1.72],
    "color": [0.14, 0.23, 0.32, 0.41, 0.5, 0.59, 0.68, 0.77, 0.86],
    "equalize": [0] * 9,
    "posterize": [4, 4, 5, 5, 6, 6, 6, 7, 7],
    "rotate": [1.0, 3.0, 4.0, 6.0, 7.0, 9.0, 10.0, 12.0, 13.0],
    "sharpness": [0.23, 0.41, 0.59, 0.77, 0.95, 1.13, 1.31, 1.49, 1.67],
    "shear_x": [0.03, 0.06, 0.09, 0.12, 0.15, 0.18, 0.21, 0.24, 0.27],
    "shear_y": [0.03, 0.06, 0.09, 0.12, 0.15, 0.18, 0.21, 0.24, 0.27],
    "solarize": [231, 205, 180, 154, 128, 103, 77, 52, 26],
}
SIGNED = ("rotate", "shear_x", "shear_y")
POOL_SIZE = 10  # the nine above + identity
DRAWS = 10_000


def _expected_slot_probabilities() -> dict[tuple, float]:
    """P(one of the two slots asks PIL for (op, magnitude)): 1/10 op x 1/9 magnitude x 1/2 applied (x 1/2 sign)."""
    probs: dict[tuple, float] = {}
    for op, values in REFERENCE_MAGNITUDES.items():
        for v in values:
            for sign in ((1, -1) if op in SIGNED else (1,)):
                key = (op, round(sign * v, 6) if op in SIGNED else v)
                probs[key] = probs.get(key, 0.0) + 1 / POOL_SIZE / 9 / 2 / (2 if op in SIGNED else 1)
    return probs


def test_augmentation_asks_pil_for_the_reference_distribution() -> None:
    from scipy import stats

    from cssr_dist.data.cssr_augment import CssrRandAugment

    torch.manual_seed(0)
    per_image = record_augment(CssrRandAugment(n=2, m=10), DRAWS)
    assert all(ops and ops[-1][0] == "cutout" for ops in per_image), "one cutout per image, after the pool"
    expected = _expected_slot_probabilities()
    counts: dict[tuple, int] = {}
    for ops in per_image:
        for op in ops[:-1]:
            counts[op] = counts.get(op, 0) + 1
    assert set(counts) <= set(expected), f"operations the reference never asks for: {set(counts) - set(expected)}"
    slots = 2 * DRAWS
    keys = sorted(expected, key=str)
    observed = [counts.get(k, 0) for k in keys] + [slots - sum(counts.values())]
    nothing = 1 - sum(expected.values())  # not applied (1/2) or identity (1/20)
    assert nothing == pytest.approx(0.55)
    want = [expected[k] * slots for k in keys] + [nothing * slots]
    assert stats.chisquare(observed, want).pvalue > 0.01
    per_image_visible = np.bincount([len(ops) - 1 for ops in per_image], minlength=3) / DRAWS
    np.testing.assert_allclose(per_image_visible, [0.55**2, 2 * 0.55 * 0.45, 0.45**2], atol=0.015)
    # cutout: x0 = int(max(0, U(0, 32) - 8)): 0 with probability 9/32, each of 1..23 with 1/32
    corners = np.array([ops[-1][1:3] for ops in per_image])
    for axis in range(2):
        hist = np.bincount(corners[:, axis], minlength=24)
        assert hist.size == 24
        assert stats.chisquare(hist, np.r_[9.0, np.ones(23)] / 32 * DRAWS).pvalue > 0.01


def test_manual_contrast_is_uniform_between_0_1_and_2() -> None:
    from scipy import stats

    from cssr_dist.data.cssr_augment import ManualContrast

    torch.manual_seed(0)
    contrast = ManualContrast(0.1, 2.0)
    factors = [float(contrast(torch.ones(1))) for _ in range(DRAWS)]
    assert stats.kstest(factors, stats.uniform(loc=0.1, scale=1.9).cdf).pvalue > 0.01
