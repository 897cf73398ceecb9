"""Encoding samples and writing one shard (used by cssr-make-shards).

Kept free of argument parsing so that the CLI, tests and other tools write shards the
same way: keys `%09d` (ids are ints), image bytes under their real format's extension,
label as ASCII in `.cls`, the source's relative name in `.txt`. A shard is written to a
temporary name and renamed when complete, so an interrupted run never leaves a shard
that looks finished (resume skips exactly the renamed ones).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import PIL.Image
import webdataset as wds

from ...data.layouts import IMAGE_READ_ERRORS
from ...data.shards.index import KEY_FORMAT, ShardInfo
from ...errors import DataError

TAR_OVERHEAD = 3 * 512  # header blocks + padding per member, roughly, for byte planning


@dataclass(frozen=True)
class EncodeOptions:
    """`original` keeps the source bytes (JPEG/PNG) untouched; `jpeg`/`png` re-encode.

    `resize` scales the shorter side DOWN to that many pixels (never up) and implies a
    re-encode (JPEG unless `png` was asked for).
    """

    encoding: str = "original"
    resize: int | None = None
    quality: int = 90

    def describe(self) -> dict:
        return {"encoding": self.effective_encoding(), "resize_shorter_side": self.resize,
                "quality": self.quality if self.effective_encoding() == "jpeg" else None}

    def effective_encoding(self) -> str:
        if self.encoding == "original" and self.resize:
            return "jpeg"
        return self.encoding


def sniff_ext(data: bytes) -> str | None:
    """Real format of image bytes (file names lie: ImageNet has a PNG named .JPEG)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def resize_shorter(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    width, height = image.size
    short = min(width, height)
    if short <= size:
        return image
    scale = size / short
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(new, PIL.Image.BICUBIC)


def encode_pil(image: PIL.Image.Image, opts: EncodeOptions) -> tuple[str, bytes]:
    if opts.resize:
        image = resize_shorter(image, opts.resize)
    buf = io.BytesIO()
    if opts.effective_encoding() == "jpeg":
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.save(buf, format="JPEG", quality=opts.quality)
        return "jpg", buf.getvalue()
    image.save(buf, format="PNG")
    return "png", buf.getvalue()


def encode_bytes(data: bytes, opts: EncodeOptions, where: str) -> tuple[str, bytes]:
    """Image file bytes -> (extension, bytes to store). Original JPEG/PNG bytes pass through."""
    ext = sniff_ext(data)
    if opts.effective_encoding() == "original" and ext is not None:
        return ext, data
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.load()
            return encode_pil(image, opts)
    except IMAGE_READ_ERRORS as err:
        raise DataError(f"cannot decode source image {where}: {err}") from None


def make_sample(sample_id: int, ext: str, image: bytes, label: int, name: str) -> dict:
    return {"__key__": KEY_FORMAT % sample_id, ext: image, "cls": str(int(label)).encode(),
            "txt": name.encode("utf-8")}


def write_shard(path: str | os.PathLike, samples: Iterable[dict]) -> ShardInfo:
    """Write samples to `path` via `path.tmp` + rename, so only complete shards carry the final name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "wb") as stream:
        # mtime fixed so that the same plan gives byte-identical shards (reproducible hashes)
        writer = wds.TarWriter(stream, encoder=False, mtime=0)
        try:
            for sample in samples:
                writer.write(sample)
                count += 1
        finally:
            writer.close()
    os.replace(tmp, path)
    return ShardInfo(name=path.name, samples=count, bytes=path.stat().st_size)


def plan_shards(sizes: list[int], samples_per_shard: int, max_bytes: int | None) -> list[range]:
    """Cut samples (in writing order) into consecutive shards by count and, optionally, bytes.

    `sizes` are estimates (source bytes); a single sample larger than `max_bytes` still
    gets a shard of its own rather than failing.
    """
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    shards, start, acc = [], 0, 0
    for i, size in enumerate(sizes):
        size += TAR_OVERHEAD
        full = i - start >= samples_per_shard or (max_bytes is not None and acc + size > max_bytes and i > start)
        if full:
            shards.append(range(start, i))
            start, acc = i, 0
        acc += size
    if start < len(sizes):
        shards.append(range(start, len(sizes)))
    return shards
