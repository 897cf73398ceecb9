"""What a run reads is what its records say, counted the way its records say (issue 20).

* A split file that names another data set than `data.dataset` is refused in one line (the
  run read one data set and recorded the other before).
* Corrupt-sample counts count samples, not tar members: a sample whose members are split
  apart in the tar, or whose key is damaged, is one corrupt sample (it counted 2 before: the
  bad group and the id missing at the shard's end; split members counted once per group).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from cssr_dist.data.readers.shards import build_shard_loaders
from cssr_dist.errors import DataError
from cssr_dist.data.splits import resolve_split
from tests.test_reliability_shards import SPLIT, crafted_copy, data_cfg, shard_set, to_tensor  # noqa: F401


def test_a_split_file_of_another_data_set_is_refused(tmp_path):
    from cssr_dist.config import DataConfig

    path = _cifar10_split(tmp_path)
    with pytest.raises(DataError, match=r"is a split of 'cifar10', but data.dataset is 'svhn'; set "
                                        r"data.dataset=cifar10") as err:
        resolve_split(DataConfig(dataset="svhn", split_file=str(path)))
    assert "\n" not in str(err.value)
    assert resolve_split(DataConfig(dataset="cifar10", split_file=str(path))).dataset == "cifar10"


def _cifar10_split(folder: Path) -> Path:
    path = folder / "spl_a.json"
    path.write_text(json.dumps({"train": [{"dataset": "cifar10", "convert_class": [0, 1, -1], "keep_class": [0, 1]}],
                                "test": [{"dataset": "cifar10", "convert_class": [0, 1, -1], "keep_class": [0, 1, -1]}]}))
    return path


def test_the_reference_cli_with_a_mismatched_split_file_fails_before_training(tmp_path, capsys):
    from cssr_dist.cli import main

    rc = main(["--config", "configs/svhn/rcssr.yaml", "--ds", str(_cifar10_split(tmp_path)),
               f"run.output_dir={tmp_path}", "run.name=x", f"data.root={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "is a split of 'cifar10', but data.dataset is 'svhn'" in err, err
    assert not (tmp_path / "x").exists()  # refused before the run folder is made


def _rewrite(tar_path: Path, reorder=None, rename=None) -> None:
    """The same tar with members renamed (`rename(name) -> name`) or reordered (`reorder(members)`)."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    if reorder:
        members = reorder(members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for member, data in members:
            member.name = rename(member.name) if rename else member.name
            out.addfile(member, io.BytesIO(data))
    tar_path.write_bytes(buf.getvalue())


def _test_loader(crafted: Path):
    cfg = data_cfg(crafted)
    cfg.shards.max_corrupt_fraction = 0.5
    return build_shard_loaders(cfg, SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)["test"]


def test_a_sample_with_a_damaged_key_counts_once(shard_set, tmp_path):
    crafted = crafted_copy(shard_set, tmp_path)
    _rewrite(crafted / "toy-000001.tar", rename=lambda n: n.replace("000000005", "00000000x"))
    loader = _test_loader(crafted)
    ids = sorted(i for _, _, batch in loader for i in batch.tolist())
    assert ids == [i for i in range(12) if i != 5]
    assert loader.corrupt_counts() == (12, 1)


def test_a_sample_whose_members_are_split_apart_counts_once(shard_set, tmp_path):
    """Shard 1 holds samples 4-7 as 4.png 4.cls 5.png 5.cls ...; reordered to 4.png 5.png 4.cls 5.cls
    6.* 7.*: samples 4 and 5 arrive as two member groups each, without their label."""
    crafted = crafted_copy(shard_set, tmp_path)

    def split_apart(members):
        by_name = sorted(members, key=lambda m: m[0].name)
        first = [m for m in by_name if m[0].name.split(".")[0] in ("000000004", "000000005")]
        rest = [m for m in by_name if m not in first]
        return sorted(first, key=lambda m: (m[0].name.split(".")[1] != "png", m[0].name)) + rest

    _rewrite(crafted / "toy-000001.tar", reorder=split_apart)
    loader = _test_loader(crafted)
    ids = sorted(i for _, _, batch in loader for i in batch.tolist())
    assert ids == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11]
    assert loader.corrupt_counts() == (12, 2)
