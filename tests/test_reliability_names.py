"""Names that become paths are plain names: `..`, `.`, empty, absolute, separators and control
characters are refused in one line when the config (or the sweep grid) is read, before any
folder is made. Paths the user gives as paths (data roots, --out) stay paths."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cssr_dist.cli import main as cli_main
from cssr_dist.config import build_config, load_config
from cssr_dist.data.open_set import ood_entries
from cssr_dist.data.splits import OpenSetSplit
from cssr_dist.errors import ConfigError, DataError
from cssr_dist.apps.sweep import expand
from tests.helpers import ROOT

BAD = ["..", ".", "", "/tmp/escape", "../escape", "a/../../b", "a\\b", "x\ny", "tab\there", "-rf"]


@pytest.mark.parametrize("name", BAD)
def test_run_name_that_leaves_the_output_dir_is_refused(name):
    with pytest.raises(ConfigError, match="run.name .* is not a plain name") as err:
        build_config({"run": {"name": name}})  # as a YAML file gives it (an override folds newlines)
    assert "\n" not in str(err.value).replace(repr(name), "")


def test_save_flag_is_checked_the_same_way(tmp_path, capsys):
    rc = cli_main(["--save", "../../escape", f"run.output_dir={tmp_path / 'runs'}", "--print-config"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: run.name = '../../escape' is not a plain name") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escape").exists()
    assert cli_main(["--save", "", "--print-config"]) == 2  # an empty --save is refused, not ignored


def test_plain_run_names_and_path_options_still_work(tmp_path):
    cfg = load_config(overrides=["run.name=fmnist_rcssr_a.s0", f"run.output_dir={tmp_path}/x/../runs",
                                 f"data.root={tmp_path}/data"])
    assert cfg.run.name == "fmnist_rcssr_a.s0"


@pytest.mark.parametrize("name", ["../secret", "/etc", "a/b", "."])
def test_ood_set_name_is_refused(name):
    with pytest.raises(ConfigError, match=r"data.ood\[0\].name .* is not a plain name"):
        load_config(overrides=[f"data.ood=[{{name: '{name}', source: imagefolder, root: /tmp/x}}]"])
    with pytest.raises(ConfigError, match=r"data.ood\[0\].name"):  # the source is the name when none is given
        load_config(overrides=[f"data.ood=[{{source: '{name}'}}]"])


def test_ood_set_named_by_a_split_file_is_refused(data_cfg):
    split = OpenSetSplit(dataset="cifar10", known=(0, 1), unknown=(2,), ood_datasets=("../../etc",), name="crafted")
    with pytest.raises(DataError, match="split 'crafted' OOD set = '../../etc' is not a plain name"):
        ood_entries(data_cfg(), split)


@pytest.mark.parametrize("field", ["datasets", "methods", "splits", "tag"])
def test_sweep_and_table_names_are_refused(field):
    kw = {"datasets": ["mnist"], "methods": ["linear"], "splits": ["0"], "tag": ""}
    kw[field] = "../../x" if field == "tag" else ["../../x"]
    with pytest.raises(ConfigError, match="is not a plain name"):
        expand(configs_dir=ROOT / "configs", **kw)


def test_collect_metrics_and_sweep_tools_refuse_in_one_line(tmp_path):
    for cmd in (["tools/collect_metrics.py", str(tmp_path), "--datasets", "mnist", "--tag", "../up"],
                ["tools/sweep.py", "--datasets", "mnist", "--splits", "/abs", "--dry-run",
                 "--output-dir", str(tmp_path / "runs")]):
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and "is not a plain name" in proc.stderr
        assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()
