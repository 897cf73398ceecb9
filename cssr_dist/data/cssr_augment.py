"""The CSSR strong augmentation (docs/method.md §5): a FixMatch-style RandAugment pool + Cutout.

Two ops are drawn WITH replacement from the pool; each gets a magnitude v in [1, 9] (of
10) and is applied with probability 0.5; a grey Cutout of half the image size follows.
All randomness comes from torch's generator, which DataLoader seeds per worker, so runs
are reproducible without extra seeding. Works on grey ('L') and RGB PIL images.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

PARAMETER_MAX = 10


def _rand() -> float:
    return float(torch.rand(()))


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high)."""
    return int(torch.randint(low, high, ()))


def _float_param(v: int, max_v: float) -> float:
    return float(v) * max_v / PARAMETER_MAX


def _int_param(v: int, max_v: float) -> int:
    return int(v * max_v / PARAMETER_MAX)


def _signed(x: float) -> float:
    return -x if _rand() < 0.5 else x


def brightness(img: Image.Image, v: int, max_v: float, bias: float) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(_float_param(v, max_v) + bias)


def color(img: Image.Image, v: int, max_v: float, bias: float) -> Image.Image:
    return ImageEnhance.Color(img).enhance(_float_param(v, max_v) + bias)


def equalize(img: Image.Image, v: int, max_v: float, bias: float) -> Image.Image:
    return ImageOps.equalize(img)


def identity(img: Image.Image, v: int, max_v: float, bias: float) -> Image.Image:
    return img


def posterize(img: Image.Image, v: int, max_v: float, bias: float) -> Image.Image:
    return ImageOps.posterize(img, _int_param(v, max_v) + int(bias))


def rotate(img: Image.Image, v: int, max_v: float, bias: float) -> Image.Image:
    return img.rotate(_signed(_int_param(v, max_v) + bias))


def sharpness(img: Image.Image, v: int, max_v: float, bias: float) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(_float_param(v, max_v) + bias)


def shear_x(img: Image.Image, v: int, max_v: float, bias: float) -> Image.Image:
    s = _signed(_float_param(v, max_v) + bias)
    return img.transform(img.size, Image.Transform.AFFINE, (1, s, 0, 0, 1, 0))


def shear_y(img: Image.Image, v: int, max_v: float, bias: float) -> Image.Image:
    s = _signed(_float_param(v, max_v) + bias)
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, s, 1, 0))


def solarize(img: Image.Image, v: int, max_v: float, bias: float) -> Image.Image:
    return ImageOps.solarize(img, 256 - (_int_param(v, max_v) + int(bias)))


class PoolOp(NamedTuple):
    fn: Callable[[Image.Image, int, float, float], Image.Image]
    max_v: float
    bias: float


#: The CSSR pool: (op, max magnitude, bias). ShearX/ShearY are two entries, as in FixMatch.
CSSR_POOL: tuple[PoolOp, ...] = (
    PoolOp(brightness, 1.8, 0.1),
    PoolOp(color, 0.9, 0.05),
    PoolOp(equalize, 0.0, 0.0),
    PoolOp(identity, 0.0, 0.0),
    PoolOp(posterize, 4, 4),
    PoolOp(rotate, 15, 0.0),
    PoolOp(sharpness, 1.8, 0.05),
    PoolOp(shear_x, 0.3, 0.0),
    PoolOp(shear_y, 0.3, 0.0),
    PoolOp(solarize, 256, 0.0),
)


def cutout(img: Image.Image, size: int, grey: int = 127) -> Image.Image:
    """Grey square of side `size` at a uniform centre, clipped at the border (FixMatch CutoutAbs)."""
    w, h = img.size
    x0 = int(max(0.0, _rand() * w - size / 2.0))
    y0 = int(max(0.0, _rand() * h - size / 2.0))
    x1, y1 = int(min(w, x0 + size)), int(min(h, y0 + size))
    out = img.copy()
    fill = grey if len(out.getbands()) == 1 else (grey,) * len(out.getbands())
    ImageDraw.Draw(out).rectangle((x0, y0, x1, y1), fill=fill)
    return out


class Cutout:
    """One grey square of `fraction` x image side per image: the cutout half of the paper's recipe on its own."""

    def __init__(self, fraction: float = 0.5) -> None:
        self.fraction = fraction

    def __call__(self, img: Image.Image) -> Image.Image:
        return cutout(img, int(img.size[0] * self.fraction))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fraction={self.fraction})"


class CssrRandAugment:
    """n ops with replacement from `pool`, magnitude in [1, m-1], each with probability p; then Cutout."""

    def __init__(self, n: int = 2, m: int = 10, p: float = 0.5, cutout_fraction: float = 0.5,
                 pool: tuple[PoolOp, ...] = CSSR_POOL) -> None:
        self.n, self.m, self.p, self.cutout_fraction, self.pool = n, m, p, cutout_fraction, pool

    def __call__(self, img: Image.Image) -> Image.Image:
        for _ in range(self.n):
            op = self.pool[_randint(0, len(self.pool))]
            v = _randint(1, self.m)
            if _rand() < self.p:
                img = op.fn(img, v, op.max_v, op.bias)
        if self.cutout_fraction > 0:
            img = cutout(img, int(img.size[0] * self.cutout_fraction))
        return img

    def __repr__(self) -> str:
        names = ", ".join(op.fn.__name__ for op in self.pool)
        return f"{type(self).__name__}(n={self.n}, m={self.m}, p={self.p}, cutout={self.cutout_fraction}, pool=[{names}])"


class ManualContrast:
    """Multiply the normalised tensor by one factor ~ U(low, high) per image (the reference's 'manual contrast')."""

    def __init__(self, low: float = 0.1, high: float = 2.0) -> None:
        self.low, self.high = low, high

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.low + (self.high - self.low) * _rand())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(low={self.low}, high={self.high})"
