"""OpenOOD v1.5's ImageNet-1k benchmark: its image lists, their sizes, image roots and groups.

OpenOOD (Zhang et al., "OpenOOD v1.5", arXiv 2306.09301) publishes `benchmark_imglist/imagenet/*.txt`,
one `path label` line per image (path relative to the image root named below, label the
sorted-wnid class index for ImageNet-1k, -1 for every OOD image). `make_shards --source filelist`
checks a list named here against its published line count, so a truncated download or a
list of another benchmark version stops with one line instead of giving a different table.

The counts were read from the published lists (e.g. the copy in
github.com/facebookresearch/UnifiedUncertaintyCalibration, benchmark_imglist/imagenet/) and
agree with the OpenOOD v1.5 paper's table (SSB-hard 49,000, NINCO 5,879, iNaturalist 10,000,
Textures 5,160, OpenImage-O 15,869). `train_imagenet.txt` is not listed: its size was not
verified here, so it is not checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

__all__ = ["OpenOODList", "IMAGENET_LISTS", "expected_lines"]


class OpenOODList(NamedTuple):
    """One published list: its line count, the image root its paths are relative to, its role."""

    lines: int
    image_root: str  # under OpenOOD's data folder
    role: str  # id-val | id-test | near | far | ood-val


#: benchmark_imglist/imagenet/<file name> -> what OpenOOD v1.5 publishes (evaluation_api/datasets.py)
IMAGENET_LISTS: dict[str, OpenOODList] = {
    "val_imagenet.txt": OpenOODList(5_000, "images_largescale", "id-val"),
    "test_imagenet.txt": OpenOODList(45_000, "images_largescale", "id-test"),
    "test_ssb_hard.txt": OpenOODList(49_000, "images_largescale", "near"),
    "test_ninco.txt": OpenOODList(5_879, "images_largescale", "near"),
    "test_inaturalist.txt": OpenOODList(10_000, "images_largescale", "far"),
    "test_textures.txt": OpenOODList(5_160, "images_classic", "far"),
    "test_openimage_o.txt": OpenOODList(15_869, "images_largescale", "far"),
    "val_openimage_o.txt": OpenOODList(1_763, "images_largescale", "ood-val"),
}


def expected_lines(list_file: str | Path) -> int | None:
    """The published line count of an OpenOOD v1.5 ImageNet-1k list, by file name; None if not one."""
    entry = IMAGENET_LISTS.get(Path(list_file).name)
    return entry.lines if entry else None
