"""A corrupt image met while a run reads a folder data set (issue 20: every reader treats its
files as untrusted): the run stops with ONE line naming the file and what to do, never with the
DataLoader worker's traceback, and exits non-zero."""

from __future__ import annotations

from pathlib import Path

import pytest

from cssr_dist.data.sources import build_source
from cssr_dist.errors import DataError, user_message
import sys

from tests.helpers import ROOT, png_folder_tree, run_session
from tests.helpers import test_env as run_env

pytestmark = pytest.mark.faults


def _folder_tree(root: Path, classes: int = 3, per_class: int = 10) -> Path:
    """root/{train,val}/<class>/*.png of real PNGs, with ONE truncated file among the training images."""
    png_folder_tree(root, classes, per_class)
    bad = root / "train" / "class_1" / "3.png"
    bad.write_bytes(bad.read_bytes()[:40])  # a PNG header and a cut-off chunk
    return bad


def test_a_truncated_image_is_one_data_error_naming_the_file(tmp_path):
    bad = _folder_tree(tmp_path)
    source = build_source("imagefolder", tmp_path, train=True)
    index = source.paths.index(str(bad))
    with pytest.raises(DataError, match=r"image .*3\.png of data set 'imagefolder' cannot be read .*replace or remove"):
        source[index]
    assert source[index - 1][0].size == (16, 16)  # its neighbours read as before


def test_user_message_unwraps_an_error_re_raised_from_a_data_loader_worker():
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\n    raise DataError(...)\n"
                        "cssr_dist.errors.DataError: image a.png cannot be read (OSError: truncated)\n")
    assert user_message(wrapped) == "image a.png cannot be read (OSError: truncated)"
    assert user_message(DataError("plain line")) == "plain line"


def test_training_on_a_folder_with_a_truncated_image_stops_in_one_line(tmp_path):
    bad = _folder_tree(tmp_path / "data")
    out = run_session([sys.executable, str(ROOT / "train.py"),
        "data.dataset=imagefolder", f"data.root={tmp_path / 'data'}", "data.split_family=none", "data.known=[0,1]",
        "data.image_size=16", "data.in_chans=3", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
        "data.train_augment=none", "data.batch_size=4", "data.eval_batch_size=8", "data.num_workers=1",
        "data.val_fraction=0", "data.ood=[]", "model.latent_dim=4", "schedule.epochs=1", "schedule.warmup_epochs=0",
        "tracking.wandb=false", "run.progress=false", f"run.output_dir={tmp_path / 'runs'}", "run.name=corrupt"],
        run_env(tmp_path), timeout=240)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "replace or remove" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Original Traceback" not in errors[0]
