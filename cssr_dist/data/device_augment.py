"""Decoding and augmenting on the device (`data.shards.decode_on: device`).

Why: at the compiled fine-tuning rate a node of 8 GPUs needs ~68 CPU cores of PIL
decoding + cropping (docs/benchmarks/scaling.md), while nvjpeg decodes ~20,000 JPEGs/s on
one H100. In this mode the shard stream's workers only read tar members: JPEG bytes
travel untouched (a tenth of a uint8 image, a fortieth of a float one) and other formats
(PNG, WebP; rare in ImageNet) as uint8 pixels decoded by PIL in the worker. The main
process then calls a `DeviceBatchStage`, which decodes the JPEGs in one batched
`torchvision.io.decode_jpeg(..., device=...)` call, crops / resizes / flips each image
on the device and normalises the batch in place. On a CPU device the same code decodes
with libjpeg-turbo, so tests and CPU runs exercise it too (the default stays
`decode_on: cpu`, the PIL path).

The geometry follows the CPU transforms (data/transforms.py) in distribution, not pixel
for pixel: `imagenet` is RandomResizedCrop(scale 0.25-1, ratio 3/4-4/3) + flip on the
decoded image (the CPU path's Resize(256) first only rescales the image; area fraction
and aspect ratio, and so the crops, do not change), `flip_crop` is resize-if-needed +
flip + reflect-padded random crop, `none` (test) is Resize(test_resize or size) + centre
crop. Resizing is bilinear with antialiasing (PIL's filter), in float, so the test path
matches PIL's numbers up to JPEG decoder and rounding differences (tested). The random
crops and flips draw from the stage's own seeded `random.Random`: the global torch RNG
belongs to the training (dropout, ...) and must not advance with the data.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import rgb_to_grayscale

from ..errors import ConfigError, DataError
from .batch_transform import empty_batch

__all__ = ["DEVICE_AUGMENTS", "DeviceBatchStage", "EncodedImages", "collate_encoded", "device_stage", "is_jpeg"]

log = logging.getLogger(__name__)

DEVICE_AUGMENTS = ("imagenet", "flip_crop", "none")
JPEG_MAGIC = b"\xff\xd8\xff"
RRC_SCALE, RRC_RATIO = (0.25, 1.0), (3 / 4, 4 / 3)  # as data/transforms.py's `imagenet`
CORRUPT_CHECK_MIN_SAMPLES = 1000  # as the shard stream: do not stop on the first bad file
MAX_LOGGED_CORRUPT = 5


class EncodedImages(NamedTuple):
    """A batch of undecoded images, in three tensors so a worker ships it in shared memory."""

    data: torch.Tensor  # uint8 [total bytes]: every image back to back
    offsets: torch.Tensor  # int64 [B + 1]: image i is data[offsets[i]:offsets[i + 1]]
    shapes: torch.Tensor  # int64 [B, 3]: (H, W, C) of uint8 pixels; (0, 0, 0) = JPEG bytes to decode


def is_jpeg(data: bytes) -> bool:
    """By content, not by member name (ImageNet has PNGs named .JPEG)."""
    return data[:3] == JPEG_MAGIC


def _shared_uint8(count: int) -> torch.Tensor:
    """A uint8 buffer in shared memory inside a loader worker (as default_collate allocates)."""
    return empty_batch((count,), dtype=torch.uint8)


def collate_encoded(samples: list[tuple[bytes | np.ndarray, int, int]]) -> tuple[EncodedImages, torch.Tensor,
                                                                                 torch.Tensor]:
    """(JPEG bytes or uint8 pixels, label, id) per sample -> (EncodedImages, labels, ids)."""
    sizes = [len(p) if isinstance(p, bytes) else p.size for p, _, _ in samples]
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    data = _shared_uint8(int(offsets[-1]))
    flat = data.numpy()
    shapes = torch.zeros(len(samples), 3, dtype=torch.int64)
    for i, (payload, _, _) in enumerate(samples):
        if isinstance(payload, bytes):
            flat[offsets[i]:offsets[i + 1]] = np.frombuffer(payload, dtype=np.uint8)
        else:
            pixels = payload if payload.ndim == 3 else payload[:, :, None]
            flat[offsets[i]:offsets[i + 1]] = pixels.reshape(-1)
            shapes[i] = torch.tensor(pixels.shape)
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    ids = torch.tensor([s[2] for s in samples], dtype=torch.int64)
    return EncodedImages(data, torch.from_numpy(offsets), shapes), labels, ids


class DeviceBatchStage:
    """(EncodedImages, labels, ids) from a `decode_on: device` loader -> (float images, labels, ids) on `device`.

    `training` picks `data.train_augment` (imagenet | flip_crop | none), else the test
    geometry. Images that do not decode are dropped with their labels and ids and
    counted; above `data.shards.max_corrupt_fraction` the run stops (as the CPU path).
    """

    def __init__(self, data_cfg: Any, *, training: bool, device: torch.device | str, seed: int = 0) -> None:
        self.kind = data_cfg.train_augment if training else "none"
        if self.kind not in DEVICE_AUGMENTS:
            raise ConfigError(f"data.shards.decode_on=device supports data.train_augment "
                              f"{' | '.join(DEVICE_AUGMENTS)}, not {self.kind!r}; use decode_on=cpu for it")
        if data_cfg.in_chans not in (1, 3):
            raise ConfigError(f"data.in_chans = {data_cfg.in_chans} is not supported; use 1 (grey) or 3 (RGB)")
        if getattr(data_cfg, "fit", "resize") != "resize":
            raise ConfigError("data.fit=pad is not supported with data.shards.decode_on=device; use decode_on=cpu")
        self.device = torch.device(device)
        self.size, self.channels = int(data_cfg.image_size), int(data_cfg.in_chans)
        self.test_resize = data_cfg.test_resize
        self.read_mode = ImageReadMode.GRAY if self.channels == 1 else ImageReadMode.RGB
        mean = torch.tensor([float(v) for v in data_cfg.mean], dtype=torch.float32)
        std = torch.tensor([float(v) for v in data_cfg.std], dtype=torch.float32)
        # x_norm = (x / 255 - mean) / std = x * scale + shift, one in-place pass over the batch
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(self.device)
        self.shift = (-mean / std).view(1, -1, 1, 1).to(self.device)
        self.rng = random.Random(seed)
        self.max_corrupt_fraction = float(data_cfg.shards.max_corrupt_fraction)
        self.seen = self.corrupt = 0

    # -- decoding
    def _decode(self, batch: EncodedImages) -> list[torch.Tensor | None]:
        """uint8 [C, H, W] per image on the device; None where an image does not decode."""
        offsets, shapes = batch.offsets.tolist(), batch.shapes.tolist()
        views = [batch.data[offsets[i]:offsets[i + 1]] for i in range(len(shapes))]
        images: list[torch.Tensor | None] = [None] * len(shapes)
        jpegs = [i for i, shape in enumerate(shapes) if shape[0] == 0]
        if jpegs:
            try:
                decoded = decode_jpeg([views[i] for i in jpegs], mode=self.read_mode, device=self.device)
            except RuntimeError:  # one bad file fails the batched call: decode one by one
                decoded = [self._decode_one(views[i]) for i in jpegs]
            for i, image in zip(jpegs, decoded):
                images[i] = image
        for i, (h, w, c) in enumerate(shapes):
            if h:
                pixels = views[i].view(h, w, c).permute(2, 0, 1).to(self.device, non_blocking=True)
                images[i] = self._channels(pixels)
        return images

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=self.read_mode, device=self.device)
        except RuntimeError:
            return None

    def _channels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [c, H, W] -> [in_chans, H, W]: grey to RGB by repetition, RGB to grey as PIL's 'L'."""
        if pixels.shape[0] == self.channels:
            return pixels
        if self.channels == 3:
            return pixels[:1].expand(3, -1, -1)
        return rgb_to_grayscale(pixels[:3])

    # -- geometry (float [C, h, w] in 0..255 -> [C, size, size])
    def _resize(self, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if image.shape[-2:] == (height, width):
            return image.float()
        return F.interpolate(image[None].float(), size=(height, width), mode="bilinear", antialias=True,
                             align_corners=False)[0]

    def _resize_shorter(self, image: torch.Tensor, short: int) -> torch.Tensor:
        """torchvision's Resize(int): the shorter side to `short`, the longer one int() of the same scale."""
        h, w = image.shape[-2:]
        if h <= w:
            return self._resize(image, short, int(short * w / h))
        return self._resize(image, int(short * h / w), short)

    def _center_crop(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
        return image[:, top:top + self.size, left:left + self.size]

    def _test_geometry(self, image: torch.Tensor) -> torch.Tensor:
        if self.test_resize:
            return self._center_crop(self._resize_shorter(image, int(self.test_resize)))
        if tuple(image.shape[-2:]) == (self.size, self.size):
            return image.float()
        return self._center_crop(self._resize_shorter(image, self.size))

    def _crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params, drawn from this stage's generator."""
        area, rng = height * width, self.rng
        log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
        for _ in range(10):
            target = area * rng.uniform(*RRC_SCALE)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        ratio = width / height  # fallback: the largest centred crop within the ratio range
        if ratio < RRC_RATIO[0]:
            w, h = width, int(round(width / RRC_RATIO[0]))
        elif ratio > RRC_RATIO[1]:
            w, h = int(round(height * RRC_RATIO[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def _train_geometry(self, image: torch.Tensor) -> torch.Tensor:
        if self.kind == "imagenet":
            top, left, h, w = self._crop_box(*image.shape[-2:])
            return self._resize(image[:, top:top + h, left:left + w], self.size, self.size)
        # flip_crop: resize if needed, then a reflect-padded random crop (padding 1/8 of the side)
        image = self._test_geometry(image)
        pad = int(self.size * 0.125)
        if pad:
            image = F.pad(image[None], (pad, pad, pad, pad), mode="reflect")[0]
            top, left = self.rng.randint(0, 2 * pad), self.rng.randint(0, 2 * pad)
            image = image[:, top:top + self.size, left:left + self.size]
        return image

    # -- the batch
    def _count(self, total: int, bad: int) -> None:
        self.seen, self.corrupt = self.seen + total, self.corrupt + bad
        if bad and self.corrupt <= MAX_LOGGED_CORRUPT:
            log.warning("skipping %d image(s) that do not decode on %s", bad, self.device)
        if bad == total:
            raise DataError(f"no image of a batch of {total} decodes on {self.device}; check the shards with "
                            "tools/make_shards.py --verify-only, or use data.shards.decode_on=cpu")
        if self.seen >= CORRUPT_CHECK_MIN_SAMPLES and self.corrupt > self.max_corrupt_fraction * self.seen:
            raise DataError(f"{self.corrupt} of {self.seen} images did not decode on {self.device} (more than "
                            f"data.shards.max_corrupt_fraction={self.max_corrupt_fraction}); check the shards "
                            "with tools/make_shards.py --verify-only")

    def __call__(self, batch: tuple[EncodedImages, torch.Tensor, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        encoded, labels, ids = batch
        if not isinstance(encoded, EncodedImages):
            raise TypeError(f"DeviceBatchStage needs batches of a decode_on=device loader, got {type(encoded).__name__}")
        decoded = self._decode(encoded)
        keep = [i for i, image in enumerate(decoded) if image is not None]
        self._count(len(decoded), len(decoded) - len(keep))
        if len(keep) < len(decoded):
            index = torch.tensor(keep, dtype=torch.int64)
            labels, ids = labels[index], ids[index]
        geometry = self._test_geometry if self.kind == "none" else self._train_geometry
        out = torch.empty(len(keep), self.channels, self.size, self.size, device=self.device)
        for row, i in enumerate(keep):
            out[row] = geometry(decoded[i])
        if self.kind != "none":
            flips = [row for row in range(len(keep)) if self.rng.random() < 0.5]
            if flips:
                index = torch.tensor(flips, dtype=torch.int64, device=self.device)
                out[index] = out[index].flip(-1)
        out.mul_(self.scale).add_(self.shift)
        return out, labels.to(self.device, non_blocking=True), ids.to(self.device, non_blocking=True)


def device_stage(data_cfg: Any, *, training: bool, device: torch.device | str,
                 seed: int = 0) -> Callable[[tuple], tuple] | None:
    """The stage a run's batches go through, or None when the loader's batches are ready
    (`data.shards.decode_on: cpu`, or files on disk). One per role: the training loader's
    with `training=True`, every evaluation loader's (val, train_eval, test, OOD) with False."""
    if data_cfg.format != "shards" or data_cfg.shards.decode_on != "device":
        return None
    return DeviceBatchStage(data_cfg, training=training, device=device, seed=seed)
