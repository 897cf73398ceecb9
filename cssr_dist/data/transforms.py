"""Train and test transforms: PIL image -> normalised float tensor [C, image_size, image_size].

`data.train_augment` picks the training recipe: 'cssr' (docs/method.md §5 exactly;
`data.manual_contrast` belongs to it and is ignored by the others), 'flip_crop',
'flip_crop_cutout' (flip, crop and the recipe's grey cutout without the op pool: the
built-in Fashion-MNIST default, chosen by docs/recipe_sweep.md), 'imagenet' (fine-tuning)
or 'none' (= the test transform). Every pipeline first converts the image to the mode
that `data.in_chans` asks for, so an OOD folder of RGB photos can be scored by a model
trained on grey images (and vice versa).

Horizontal flips are kept for every data set, as in the reference recipe, including the
grey ones: Fashion-MNIST's classes (clothes, shoes, bags) are mirror-symmetric, and the
recipe is applied unchanged to digits (MNIST/SVHN) for comparability with the paper.
"""

from __future__ import annotations

from typing import Any

from PIL import Image
from torchvision import transforms as tv_transforms

from ..errors import ConfigError
from .cssr_augment import CssrRandAugment, Cutout, ManualContrast


class EnsureMode:
    """Convert a PIL image to 'L' (1 channel) or 'RGB' (3 channels); no-op when already there."""

    def __init__(self, in_chans: int) -> None:
        if in_chans not in (1, 3):
            raise ConfigError(f"data.in_chans = {in_chans} is not supported; use 1 (grey) or 3 (RGB)")
        self.mode = "L" if in_chans == 1 else "RGB"

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode})"


class ResizeIfNeeded:
    """Resize (shorter side) + centre crop to `size` only when the image is not already size x size.

    Native-resolution benchmarks (28/32/64 px) then pay nothing, while OOD folders of
    arbitrary images still batch.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.resize = tv_transforms.Compose([tv_transforms.Resize(size), tv_transforms.CenterCrop(size)])

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.size == (self.size, self.size) else self.resize(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.size})"


class PadIfSmaller:
    """A centred zero border that brings a smaller image to `size` x `size` (larger ones: `ResizeIfNeeded`).

    The reference code fed 28 px data sets to its 32 px networks this way; resizing instead
    would enlarge every object by 32/28 and is a different input geometry.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.larger = ResizeIfNeeded(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if w > self.size or h > self.size:
            return self.larger(img)
        left, top = (self.size - w) // 2, (self.size - h) // 2
        return tv_transforms.functional.pad(img, [left, top, self.size - w - left, self.size - h - top], fill=0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.size})"


def _fit(data_cfg: Any) -> Any:
    """ResizeIfNeeded or PadIfSmaller, as `data.fit` says."""
    size, fit = data_cfg.image_size, getattr(data_cfg, "fit", "resize")
    if fit == "pad":
        return PadIfSmaller(size)
    if fit == "resize":
        return ResizeIfNeeded(size)
    raise ConfigError(f"data.fit = {fit!r} is not valid; choose resize or pad")


def _normalize(data_cfg: Any) -> list:
    return [tv_transforms.ToTensor(), tv_transforms.Normalize(list(data_cfg.mean), list(data_cfg.std))]


def build_test_transform(data_cfg: Any) -> tv_transforms.Compose:
    size = data_cfg.image_size
    geometry = [tv_transforms.Resize(data_cfg.test_resize), tv_transforms.CenterCrop(size)] if data_cfg.test_resize else [_fit(data_cfg)]
    return tv_transforms.Compose([EnsureMode(data_cfg.in_chans), *geometry, *_normalize(data_cfg)])


def _flip_crop(size: int) -> list:
    return [tv_transforms.RandomHorizontalFlip(), tv_transforms.RandomCrop(size, padding=int(size * 0.125), padding_mode="reflect")]


def build_train_transform(data_cfg: Any) -> tv_transforms.Compose:
    size, kind = data_cfg.image_size, data_cfg.train_augment
    head = [EnsureMode(data_cfg.in_chans)]
    if kind == "cssr":
        tail = [ManualContrast(0.1, 2.0)] if data_cfg.manual_contrast else []
        return tv_transforms.Compose([*head, _fit(data_cfg), *_flip_crop(size), CssrRandAugment(n=2, m=10), *_normalize(data_cfg), *tail])
    if kind == "flip_crop":
        return tv_transforms.Compose([*head, _fit(data_cfg), *_flip_crop(size), *_normalize(data_cfg)])
    if kind == "flip_crop_cutout":
        return tv_transforms.Compose([*head, _fit(data_cfg), *_flip_crop(size), Cutout(0.5), *_normalize(data_cfg)])
    if kind == "imagenet":
        resize = round(size * 256 / 224)
        return tv_transforms.Compose([*head, tv_transforms.Resize(resize), tv_transforms.RandomResizedCrop(size, scale=(0.25, 1.0)), tv_transforms.RandomHorizontalFlip(), *_normalize(data_cfg)])
    if kind == "none":
        return build_test_transform(data_cfg)
    raise ConfigError(f"data.train_augment = {kind!r} is not valid; choose one of cssr, flip_crop, flip_crop_cutout, imagenet, none")


def build_transform(data_cfg: Any, train: bool) -> tv_transforms.Compose:
    """Training transform for `data.train_augment`, or the test transform.

    null mean/std/image_size stand for the pretrained backbone's values; they are filled
    once, when the config is loaded (`models.backbones.resolve_backbone_data_config`), so
    that train and test read the same numbers.
    """
    if data_cfg.mean is None or data_cfg.std is None or data_cfg.image_size is None:
        raise ConfigError("data.mean/std/image_size are null (= the backbone's) but were never resolved; "
                          "load the config through cssr_dist.config (resolve_backbone_data_config)")
    return build_train_transform(data_cfg) if train else build_test_transform(data_cfg)
