"""decode_on=device: workers ship JPEG bytes, a DeviceBatchStage decodes and transforms them.

Run on the CPU device here (libjpeg-turbo instead of nvjpeg, same code): the batches carry
the same samples, labels and ids in the same order as the PIL path, the test geometry
gives the PIL path's numbers up to decoder/rounding differences, the training crops have
the right shapes and ranges and are reproducible, undecodable images are dropped with
their labels and counted.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from cssr_dist.config import DataConfig
from cssr_dist.data.device_augment import DeviceBatchStage, EncodedImages, collate_encoded, device_stage
from cssr_dist.apps.make_shards.cli import ShardOptions, make_shard_set
from cssr_dist.data.layouts import list_imagefolder
from cssr_dist.data.readers.shards import build_shard_loaders
from cssr_dist.data.splits import OpenSetSplit
from cssr_dist.data.transforms import build_test_transform
from cssr_dist.errors import ConfigError, DataError

SPLIT = OpenSetSplit("toy", (3, 1), name="toy")  # classes 0 and 2 unknown
SIZE = 32
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def photo(rng: np.random.Generator, height: int, width: int) -> PIL.Image.Image:
    """Smooth colour field + mild noise: what resampling filters are designed for."""
    coarse = PIL.Image.fromarray(rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), PIL.Image.BICUBIC), dtype=np.float32)
    return PIL.Image.fromarray(np.clip(smooth + rng.normal(0, 4, smooth.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dev")
    rng = np.random.default_rng(0)
    for name, per_class in (("train", 8), ("test", 4)):
        root = tmp / f"raw_{name}"
        for c in range(4):
            (root / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                h, w = (48 + 8 * (i % 3), 64 - 4 * (i % 4))
                image = photo(rng, h, w)
                if i == 1:  # one PNG per class: shipped as uint8 pixels, not bytes
                    image.save(root / f"c{c}" / f"{i}.png")
                else:
                    image.save(root / f"c{c}" / f"{i}.jpg", quality=92)
        make_shard_set(list_imagefolder(root, name, "train"), tmp / "shards" / name,
                       ShardOptions(samples_per_shard=4, progress=False))
    return tmp / "shards"


def config(root: Path, decode_on: str, **kw) -> DataConfig:
    cfg = DataConfig(format="shards", root=str(root), image_size=SIZE, in_chans=kw.pop("in_chans", 3),
                     mean=kw.pop("mean", MEAN), std=kw.pop("std", STD), batch_size=4, eval_batch_size=5,
                     num_workers=kw.pop("num_workers", 0), val_fraction=0.0, **kw)
    cfg.shards.train, cfg.shards.test, cfg.shards.shuffle_buffer = "train", "test", 6
    cfg.shards.decode_on = decode_on
    return cfg


def loaders(cfg: DataConfig) -> dict:
    from cssr_dist.data.transforms import build_train_transform

    return build_shard_loaders(cfg, SPLIT, build_train_transform(cfg), build_test_transform(cfg), seed=3)


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_ship_jpeg_bytes_and_pixels_with_labels_and_ids_in_the_cpu_paths_order(shards, workers):
    cpu = loaders(config(shards, "cpu", num_workers=workers))["test"]
    dev = loaders(config(shards, "device", num_workers=workers))["test"]
    cpu_batches, dev_batches = list(cpu), list(dev)
    assert [b[2].tolist() for b in dev_batches] == [b[2].tolist() for b in cpu_batches]
    assert [b[1].tolist() for b in dev_batches] == [b[1].tolist() for b in cpu_batches]
    assert all(isinstance(b[0], EncodedImages) and b[0].data.dtype == torch.uint8 for b in dev_batches)
    kinds = torch.cat([b[0].shapes for b in dev_batches])
    assert (kinds[:, 0] == 0).sum() == 12 and (kinds[kinds[:, 0] > 0] == torch.tensor([56, 60, 3])).all(), \
        "12 JPEGs travel as bytes, the 4 PNGs (56 x 60) as uint8 pixels"
    for encoded, _, _ in dev_batches:
        for i in range(len(encoded.shapes)):
            head = bytes(encoded.data[encoded.offsets[i]:encoded.offsets[i] + 3].tolist())
            assert (head == b"\xff\xd8\xff") == (encoded.shapes[i, 0] == 0)


def test_test_geometry_matches_the_pil_transform(shards):
    for test_resize in (None, 36):
        cfg = config(shards, "device", test_resize=test_resize)
        stage = DeviceBatchStage(cfg, training=False, device="cpu")
        cpu_cfg = config(shards, "cpu", test_resize=test_resize)
        for (encoded, labels, ids), (expected, cpu_labels, cpu_ids) in zip(loaders(cfg)["test"],
                                                                          loaders(cpu_cfg)["test"]):
            images, out_labels, out_ids = stage((encoded, labels, ids))
            assert images.shape == expected.shape == (len(ids), 3, SIZE, SIZE)
            assert out_labels.tolist() == cpu_labels.tolist() and out_ids.tolist() == cpu_ids.tolist()
            diff = (images - expected).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255  # in 0..255 levels
            # measured: mean 0.28-0.33, max 1.0 level (PIL rounds its resized image to uint8;
            # Pillow and torchvision decode with the same libjpeg-turbo here). nvjpeg on a GPU
            # differs by a few levels more; a wrong crop or resize would differ by tens
            assert diff.mean() < 0.5, f"test_resize={test_resize}: mean |diff| {diff.mean():.2f} levels"
            assert diff.max() < 2.0, f"test_resize={test_resize}: max |diff| {diff.max():.1f} levels"


@pytest.mark.parametrize("augment", ["imagenet", "flip_crop"])
def test_training_crops_have_the_shape_range_and_order_of_the_batch_and_are_reproducible(shards, augment):
    cfg = config(shards, "device", train_augment=augment)
    batches = list(zip(range(3), loaders(cfg)["train"]))
    cpu_batches = list(zip(range(3), loaders(config(shards, "cpu", train_augment=augment))["train"]))
    low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    outputs = []
    for seed in (5, 5, 6):
        stage = device_stage(cfg, training=True, device="cpu", seed=seed)
        outputs.append([stage(batch) for _, batch in batches])
    for (images, labels, ids), (_, (_, cpu_labels, cpu_ids)) in zip(outputs[0], cpu_batches):
        assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
        assert labels.tolist() == cpu_labels.tolist() and ids.tolist() == cpu_ids.tolist()
        per_channel = images.transpose(0, 1).reshape(3, -1)
        assert (per_channel.min(1).values >= low - 1e-4).all() and (per_channel.max(1).values <= high + 1e-4).all()
        assert images.std() > 0.1  # an image, not a constant
    same = all(torch.equal(a[0], b[0]) for a, b in zip(outputs[0], outputs[1]))
    other = any(not torch.equal(a[0], b[0]) for a, b in zip(outputs[0], outputs[2]))
    assert same and other, "crops and flips come from the stage's own seed"


def test_grey_models_get_one_channel_close_to_pil_l(shards):
    cfg = config(shards, "device", in_chans=1, mean=[0.5], std=[0.25])
    cpu_cfg = config(shards, "cpu", in_chans=1, mean=[0.5], std=[0.25])
    stage = DeviceBatchStage(cfg, training=False, device="cpu")
    batch, expected = next(iter(loaders(cfg)["test"])), next(iter(loaders(cpu_cfg)["test"]))[0]
    images = stage(batch)[0]
    assert images.shape == expected.shape == (5, 1, SIZE, SIZE)
    assert ((images - expected).abs() * 0.25 * 255).mean() < 1.5


def jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    photo(np.random.default_rng(seed), 40, 40).save(buf, format="JPEG")
    return buf.getvalue()


def test_undecodable_images_are_dropped_with_their_labels_and_counted():
    cfg = config(Path("."), "device")
    cfg.shards.max_corrupt_fraction = 0.5
    good = jpeg_bytes(1)
    garbage = b"\xff\xd8\xff" + bytes(200)  # a JPEG header and nothing decodable
    batch = collate_encoded([(good, 0, 10), (garbage, 1, 11), (jpeg_bytes(2), 2, 12)])
    stage = DeviceBatchStage(cfg, training=False, device="cpu")
    images, labels, ids = stage(batch)
    assert images.shape[0] == 2 and labels.tolist() == [0, 2] and ids.tolist() == [10, 12]
    assert (stage.seen, stage.corrupt) == (3, 1)
    with pytest.raises(DataError, match="no image of a batch of 1 decodes"):
        stage(collate_encoded([(garbage, 1, 13)]))


def test_device_mode_is_opt_in_and_refuses_cpu_only_augmentations(shards):
    assert device_stage(config(shards, "cpu"), training=True, device="cpu") is None
    with pytest.raises(ConfigError, match="decode_on=device supports data.train_augment"):
        DeviceBatchStage(config(shards, "device", train_augment="cssr"), training=True, device="cpu")
    assert isinstance(device_stage(config(shards, "device", train_augment="cssr"), training=False, device="cpu"),
                      DeviceBatchStage)  # evaluation has one geometry whatever the training recipe
    with pytest.raises(ConfigError, match="data.fit=pad is not supported"):
        DeviceBatchStage(config(shards, "device", fit="pad"), training=False, device="cpu")
