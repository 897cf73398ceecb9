"""Transforms: test pipeline numbers, the CSSR augmentation pool, the other recipes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from cssr_dist.data import cssr_augment as A
from cssr_dist.data.transforms import build_transform
from cssr_dist.errors import ConfigError


def _img(mode: str, size: tuple[int, int] = (28, 28), seed: int = 0) -> Image.Image:
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8))


def test_test_transform_is_exact_normalisation(data_cfg):
    img = _img("L")
    x = build_transform(data_cfg(), train=False)(img)
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    expected = (torch.from_numpy(np.array(img)).float() / 255 - 0.5) / 0.25
    assert torch.allclose(x[0], expected, atol=1e-6)


def test_test_transform_resizes_only_when_needed(data_cfg):
    cfg = data_cfg(image_size=32, in_chans=3, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    tf = build_transform(cfg, train=False)
    assert tf(_img("RGB", (32, 32))).shape == (3, 32, 32)
    assert tf(_img("RGB", (50, 40))).shape == (3, 32, 32)  # non-square OOD image: resize + centre crop
    assert tf(_img("L", (32, 32))).shape == (3, 32, 32)  # grey image for an RGB model
    cfg.test_resize = 40
    assert build_transform(cfg, train=False)(_img("RGB", (64, 64))).shape == (3, 32, 32)


def test_fit_pad_puts_a_zero_border_around_a_smaller_image(data_cfg):
    """data.fit=pad: 28 px grey -> 32 px RGB as the reference code fed Fashion-MNIST to its 32 px WRN."""
    cfg = data_cfg(image_size=32, in_chans=3, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], fit="pad")
    img = _img("L")
    x = build_transform(cfg, train=False)(img)
    pixels = torch.from_numpy(np.array(img)).float() / 255
    padded = torch.nn.functional.pad(pixels, (2, 2, 2, 2))
    assert torch.allclose(x, ((padded - 0.5) / 0.25).expand(3, 32, 32), atol=1e-6)
    assert build_transform(cfg, train=False)(_img("RGB", (50, 40))).shape == (3, 32, 32)  # larger: resized
    cfg.fit = "resize"  # the default enlarges the object instead
    assert not torch.allclose(build_transform(cfg, train=False)(img), x)
    torch.manual_seed(0)
    cfg.fit, cfg.train_augment = "pad", "flip_crop"
    assert build_transform(cfg, train=True)(img).shape == (3, 32, 32)


def test_rgb_image_for_grey_model(data_cfg):
    assert build_transform(data_cfg(), train=False)(_img("RGB")).shape == (1, 28, 28)


@pytest.mark.parametrize("mode,chans", [("L", 1), ("RGB", 3)])
@pytest.mark.parametrize("contrast", [True, False])
def test_cssr_train_transform_shape_and_range(data_cfg, mode, chans, contrast):
    cfg = data_cfg(image_size=28, in_chans=chans, mean=[0.5] * chans, std=[0.25] * chans, manual_contrast=contrast)
    tf = build_transform(cfg, train=True)
    torch.manual_seed(0)
    outs = torch.stack([tf(_img(mode, seed=i)) for i in range(40)])
    assert outs.shape == (40, chans, 28, 28) and outs.dtype == torch.float32
    bound = 4.0 if contrast else 2.0  # normalised pixels lie in [-2, 2]; contrast factor <= 2
    assert outs.abs().max() <= bound + 1e-5
    grey = (127 / 255 - 0.5) / 0.25
    if not contrast:  # every image has a grey Cutout patch
        assert all(((o - grey).abs() < 1e-5).all(0).sum() >= 14 * 14 // 2 for o in outs)


def test_cssr_train_transform_is_reproducible(data_cfg):
    tf = build_transform(data_cfg(), train=True)
    torch.manual_seed(3)
    a = tf(_img("L"))
    torch.manual_seed(3)
    b = tf(_img("L"))
    torch.manual_seed(4)
    c = tf(_img("L"))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("op", A.CSSR_POOL, ids=lambda op: op.fn.__name__)
def test_every_pool_op_keeps_size_and_mode(mode, op):
    img = _img(mode, (32, 32))
    for v in range(1, 10):
        out = op.fn(img, v, op.max_v, op.bias)
        assert out.size == img.size and out.mode == mode


def test_pool_is_the_specified_one():
    names = [op.fn.__name__ for op in A.CSSR_POOL]
    assert names == ["brightness", "color", "equalize", "identity", "posterize", "rotate", "sharpness", "shear_x", "shear_y", "solarize"]
    params = {op.fn.__name__: (op.max_v, op.bias) for op in A.CSSR_POOL}
    assert params["brightness"] == (1.8, 0.1) and params["color"] == (0.9, 0.05) and params["posterize"] == (4, 4)
    assert params["rotate"] == (15, 0) and params["sharpness"] == (1.8, 0.05) and params["solarize"] == (256, 0)
    assert params["shear_x"] == params["shear_y"] == (0.3, 0)


def test_randaugment_draws_with_replacement_magnitudes_and_probability():
    calls: list[tuple[str, int]] = []

    def recorder(name):
        def fn(img, v, max_v, bias):
            calls.append((name, v))
            return img
        fn.__name__ = name
        return fn

    pool = (A.PoolOp(recorder("a"), 1, 0), A.PoolOp(recorder("b"), 1, 0))
    aug = A.CssrRandAugment(n=2, m=10, p=1.0, cutout_fraction=0.0, pool=pool)
    torch.manual_seed(0)
    pairs = []
    for _ in range(200):
        calls.clear()
        aug(_img("L"))
        pairs.append(tuple(c[0] for c in calls))
        assert len(calls) == 2
    assert ("a", "a") in pairs and ("b", "b") in pairs and ("a", "b") in pairs  # with replacement
    calls.clear()
    half = A.CssrRandAugment(n=2, m=10, p=0.5, cutout_fraction=0.0, pool=pool)
    for _ in range(1000):
        half(_img("L"))
    assert 0.45 < len(calls) / 2000 < 0.55
    assert {v for _, v in calls} == set(range(1, 10))


def test_cutout_is_grey_square_of_half_size():
    torch.manual_seed(1)
    for mode in ("L", "RGB"):
        img = Image.new(mode, (28, 28), 0 if mode == "L" else (0, 0, 0))
        out = np.asarray(A.cutout(img, 14))
        grey = out == 127 if mode == "L" else (out == 127).all(-1)
        rows, cols = np.flatnonzero(grey.any(1)), np.flatnonzero(grey.any(0))
        assert grey.sum() == len(rows) * len(cols)  # a filled rectangle
        assert 1 <= len(rows) <= 15 and 1 <= len(cols) <= 15


def test_manual_contrast_factor_range():
    torch.manual_seed(0)
    mc = A.ManualContrast(0.1, 2.0)
    factors = torch.tensor([float(mc(torch.ones(1))) for _ in range(2000)])
    assert factors.min() >= 0.1 and factors.max() <= 2.0
    assert abs(float(factors.mean()) - 1.05) < 0.05


def test_other_recipes(data_cfg):
    rgb = dict(in_chans=3, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    cfg = data_cfg(image_size=32, train_augment="imagenet", **rgb)
    assert build_transform(cfg, train=True)(_img("RGB", (60, 45))).shape == (3, 32, 32)
    cfg = data_cfg(image_size=28, train_augment="flip_crop")
    assert build_transform(cfg, train=True)(_img("L")).shape == (1, 28, 28)
    cfg = data_cfg(train_augment="none")
    img = _img("L")
    assert torch.equal(build_transform(cfg, train=True)(img), build_transform(cfg, train=False)(img))


def test_flip_crop_cutout_paints_one_grey_square(data_cfg):
    """The default Fashion-MNIST recipe: on a white image, the only non-white pixels are the cutout."""
    cfg = data_cfg(image_size=28, train_augment="flip_crop_cutout", in_chans=1, mean=[0.0], std=[1.0])
    transform = build_transform(cfg, train=True)
    assert "Cutout(fraction=0.5)" in repr(transform)
    white = Image.new("L", (28, 28), 255)
    areas = []
    for seed in range(20):
        random.seed(seed), torch.manual_seed(seed)
        x = transform(white)[0]
        grey = (x - 127 / 255).abs() < 1e-6
        assert bool(((x == 1.0) | grey).all())
        rows, cols = np.flatnonzero(grey.any(1)), np.flatnonzero(grey.any(0))
        assert grey.sum() == len(rows) * len(cols) and len(rows) <= 15 and len(cols) <= 15
        areas.append(int(grey.sum()))
    assert max(areas) >= 14 * 14 and min(areas) < max(areas)  # a full half-side square, clipped at borders


def test_bad_settings():
    from cssr_dist.config import DataConfig

    with pytest.raises(ConfigError, match="train_augment"):
        build_transform(DataConfig(train_augment="autoaugment"), train=True)
    with pytest.raises(ConfigError, match="in_chans = 2"):
        build_transform(DataConfig(in_chans=2), train=False)
    with pytest.raises(ConfigError, match="data.fit"):
        build_transform(DataConfig(fit="stretch"), train=False)
