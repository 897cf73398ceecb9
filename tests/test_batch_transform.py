"""The shard loader's split transform gives the numbers of the per-image transform."""

import random

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision import transforms as T

from cssr_dist.config import DataConfig
from cssr_dist.data.batch_transform import BatchTail, empty_batch, split_at_to_tensor
from cssr_dist.data.transforms import build_transform


def _images(n: int, mode: str, size: tuple[int, int] = (40, 36)) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    return [PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(n)]


@pytest.mark.parametrize("mode,in_chans", [("RGB", 3), ("L", 1)])
def test_split_test_transform_equals_per_image(mode, in_chans):
    cfg = DataConfig(image_size=32, in_chans=in_chans, mean=[0.4] * in_chans, std=[0.2] * in_chans, test_resize=36)
    whole = build_transform(cfg, train=False)
    per_image, per_batch = split_at_to_tensor(whole)
    images = _images(5, mode)
    uint8 = torch.stack([per_image(im) for im in images])
    assert uint8.dtype == torch.uint8 and uint8.shape == (5, in_chans, 32, 32)
    expected = torch.stack([whole(im) for im in images])
    torch.testing.assert_close(per_batch(uint8), expected, rtol=0, atol=1e-6)


def test_split_train_transform_applies_manual_contrast_per_image():
    cfg = DataConfig(image_size=32, in_chans=3, mean=[0.5] * 3, std=[0.25] * 3, train_augment="cssr",
                     manual_contrast=True)
    per_image, per_batch = split_at_to_tensor(build_transform(cfg, train=True))
    assert isinstance(per_batch, BatchTail) and "ManualContrast" in repr(per_batch)
    random.seed(3)
    uint8 = torch.stack([per_image(im) for im in _images(6, "RGB", (32, 32))])
    got = per_batch(uint8)
    plain = T.Normalize([0.5] * 3, [0.25] * 3)(uint8.float() / 255)
    # each image is its normalised self times one factor in [0.1, 2], drawn per image
    factors = (got.flatten(1) * plain.flatten(1)).sum(1) / plain.flatten(1).pow(2).sum(1)
    torch.testing.assert_close(got, plain * factors[:, None, None, None], rtol=1e-5, atol=1e-5)
    assert ((factors >= 0.1) & (factors <= 2.0)).all() and len(set(factors.tolist())) == 6


def test_no_to_tensor_means_no_split():
    only_pil = T.Compose([T.CenterCrop(8)])
    assert split_at_to_tensor(only_pil) == (only_pil, None)
    assert split_at_to_tensor(None) == (None, None)


class _SharedFlag(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.tensor([empty_batch((2, 3)).is_shared()])


def test_batches_are_allocated_in_shared_memory_inside_workers_only():
    assert not empty_batch((2, 3)).is_shared()
    loader = torch.utils.data.DataLoader(_SharedFlag(), batch_size=None, num_workers=1)
    assert [bool(flag) for flag in loader] == [True]


def test_batch_stage_runs_in_the_main_process_only_when_every_loader_process_has_a_core(monkeypatch):
    from cssr_dist.data import batch_transform as bt

    monkeypatch.setattr(bt.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert bt.main_process_has_a_core(3)          # 2 ranks x (3 workers + main) = 8 cores
    assert not bt.main_process_has_a_core(4)      # 10 processes on 8 cores: keep it in the workers
    assert not bt.main_process_has_a_core(0)      # no workers: one process does everything anyway


@pytest.mark.parametrize("setting,expected", [("1", "True"), ("0", "False")])
def test_heap_reuse_is_applied_on_glibc_and_can_be_switched_off(setting, expected):
    import subprocess
    import sys

    code = "from cssr_dist.data.heap_reuse import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "CSSR_DIST_HEAP_REUSE": setting})
    assert out.returncode == 0 and out.stdout.strip() == expected, out.stderr
