"""Pre-flight (engine/preflight.py, `python -m cssr_dist.apps.preflight`): shard indexes, weight files
and output folders are checked before any node starts, one line per problem."""

from __future__ import annotations

import fcntl
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cssr_dist.apps.make_shards.cli import main as make_shards
from cssr_dist.apps.preflight import main as preflight_main
from cssr_dist.apps.sweep import SlurmResources, job_processes
from cssr_dist.config import load_config
from cssr_dist.engine.preflight import preflight, safetensors_header_problem
from tests.conftest import write_images

ROOT = Path(__file__).resolve().parent.parent
OPENOOD = ROOT / "configs" / "imagenet" / "openood_rcssr.yaml"
SETS = ["imagenet-train", "openood-imagenet-test", "openood-ssb_hard", "openood-ninco", "openood-inaturalist",
        "openood-textures", "openood-openimage_o"]


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> Path:
    """Every shard set of configs/imagenet/openood_rcssr.yaml, 2 images each (the same tiny folder)."""
    tmp = tmp_path_factory.mktemp("pre")
    for c in range(2):
        write_images(tmp / "img" / f"n{c:08d}", ["a.png"], seed=c)
    root = tmp / "shards"
    for name in SETS:
        source = ["--source", "ood"] if name.startswith("openood-") and name != "openood-imagenet-test" else \
            ["--source", "imagefolder"]
        assert make_shards([*source, "--root", str(tmp / "img"), "--out", str(root / name), "--workers", "1",
                            "--no-progress"]) == 0
    return root


def _cfg(root: Path, tmp: Path, *overrides: str):
    weights = tmp / "w.safetensors"
    if not weights.exists():
        save_file({"conv1.weight": torch.zeros(2, 3, 1, 1)}, str(weights))
    return load_config(OPENOOD, [f"data.root={root}", f"model.pretrained_file={weights}", f"run.output_dir={tmp / 'runs'}",
                                 *overrides])


def test_a_complete_run_passes(shard_root, tmp_path):
    assert preflight(_cfg(shard_root, tmp_path)) == []


def test_a_wrong_data_root_is_one_line(shard_root, tmp_path):
    problems = preflight(_cfg(tmp_path / "nowhere", tmp_path))
    assert len(problems) == 1 and problems[0].startswith(f"data.root: {tmp_path / 'nowhere'} is not a folder")


def test_each_broken_shard_set_is_named(shard_root, tmp_path):
    root = tmp_path / "copy"
    root.mkdir()
    for file in shard_root.iterdir():
        os.symlink(file, root / file.name)
    (root / "openood-ninco.json").unlink()  # a set never made
    (root / "openood-textures.json").unlink()
    (root / "openood-textures.json").write_text("{not json")  # a corrupt index
    (root / "openood-inaturalist-000000.tar").unlink()  # a shard not copied
    problems = preflight(_cfg(root, tmp_path))
    assert len(problems) == 3, problems
    assert problems[0].startswith("data.ood[1] (ninco): shard index not found")
    assert problems[1].startswith("data.ood[2] (inaturalist): 1 of 1 shard files listed in") and "missing" in problems[1]
    assert problems[2].startswith("data.ood[3] (textures): cannot read shard index")


def test_weight_files(shard_root, tmp_path):
    assert preflight(_cfg(shard_root, tmp_path, f"model.pretrained_file={tmp_path / 'none.safetensors'}")) == \
        [f"model.pretrained_file: {tmp_path / 'none.safetensors'} does not exist"]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**15) + b"{}")  # a header length no file has
    assert safetensors_header_problem(bad) == \
        f"{bad} is not a safetensors file (Error while deserializing header: header too large)"
    bad.write_bytes(struct.pack("<Q", 6) + b"nojson")
    assert safetensors_header_problem(bad).startswith(f"{bad} is not a safetensors file (") and "JSON" in \
        safetensors_header_problem(bad)
    bad.write_bytes(struct.pack("<Q", 2) + b"{}")  # well formed, no tensor
    assert safetensors_header_problem(bad) == f"{bad} is a safetensors file that lists no tensors"
    bad.write_bytes(b"PK\x03")  # a zip (torch.save) renamed
    assert safetensors_header_problem(bad) == \
        f"{bad} is not a safetensors file (Error while deserializing header: header too small)"
    assert preflight(_cfg(shard_root, tmp_path, f"model.pretrained_file={bad}")) == \
        [f"model.pretrained_file: {bad} is not a safetensors file (Error while deserializing header: header too small)"]
    assert safetensors_header_problem(tmp_path).startswith(f"cannot read {tmp_path}: ")  # a folder


def test_output_folders(shard_root, tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the runs folder should go")  # as root, permissions would not stop a write
    assert preflight(_cfg(shard_root, tmp_path, f"run.output_dir={blocker / 'runs'}")) == \
        [f"run.output_dir: {blocker / 'runs'} cannot be created or written ({blocker} is not a writable folder)"]


def test_another_runs_folder_and_a_folder_in_use(shard_root, tmp_path):
    cfg = _cfg(shard_root, tmp_path)
    run = Path(cfg.run.output_dir) / cfg.run.name
    run.mkdir(parents=True)
    (run / "history.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")  # trained, nothing to resume from
    problems = preflight(cfg)
    assert len(problems) == 1 and problems[0].startswith(f"run folder {run} holds a trained run (history.jsonl)")
    (run / "history.jsonl").unlink()
    with open(run / ".lock", "w") as lock:  # what RunFolder.lock holds while a job runs
        lock.write("pid 1 on nodeX since 2026-12-07 01:00:00\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert preflight(cfg) == [f"run folder {run} is in use by another job (pid 1 on nodeX since 2026-12-07 "
                                  "01:00:00); wait for it or choose another run.name"]
    assert preflight(cfg) == []  # lock released, empty folder: a fresh start


def test_the_program_prints_the_run_folder_or_one_line_per_problem(shard_root, tmp_path, capsys):
    args = ["--config", str(OPENOOD), f"data.root={shard_root}", f"run.output_dir={tmp_path / 'runs'}",
            "run.name=r1", "model.pretrained=false"]
    assert preflight_main(args) == 0
    assert capsys.readouterr().out.strip() == str((tmp_path / "runs" / "r1").resolve())
    assert preflight_main([*args, f"data.root={tmp_path}/x", "model.pretrained_file=/nonexistent.safetensors"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.splitlines() == [
        f"preflight: data.root: {tmp_path}/x is not a folder; the shard prefixes (imagenet-train, "
        "openood-imagenet-test, openood-ssb_hard, ...) are looked up there",
        "preflight: model.pretrained_file: /nonexistent.safetensors does not exist"]


def test_every_shard_set_needs_a_shard_per_process(shard_root, tmp_path, capsys):
    """Each process streams whole shards: a set with fewer shards than the job's processes would stop
    the run once every node has started (NINCO's 5,879 images at make_shards' default
    1000 a shard are 6 shards: too few for 8 GPUs; docs/openood_imagenet.md, steps 2-3)."""
    cfg = _cfg(shard_root, tmp_path)
    assert preflight(cfg, world_size=1) == []
    problems = preflight(cfg, world_size=2)
    assert [p.split(":")[0] for p in problems] == ["data.shards.train", "data.shards.test"] + [
        f"data.ood[{i}] ({name})" for i, name in enumerate(("ssb_hard", "ninco", "inaturalist", "textures",
                                                             "openimage_o"))]
    assert problems[3] == (f"data.ood[1] (ninco): 1 shards in {shard_root / 'openood-ninco.json'} for 2 processes "
                           "(each reads whole shards: one at least); re-run tools/make_shards.py with "
                           "--samples-per-shard 1 or fewer")
    args = ["--config", str(OPENOOD), f"data.root={shard_root}", f"run.output_dir={tmp_path / 'runs'}",
            "model.pretrained=false"]
    assert preflight_main(["--processes", "2", *args]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 7
    assert preflight_main([*args, "--processes", "0"]) == 2
    assert capsys.readouterr().err == "error: --processes '0': give the job's number of processes (1 or more)\n"


def test_a_sweep_preflights_each_run_for_its_jobs_processes():
    cfg = load_config(OPENOOD, [])
    assert job_processes(cfg) == 16  # slurm/imagenet_rcssr.sh's 2 nodes x 8 GPUs
    assert job_processes(cfg, SlurmResources(nodes=4, gpus_per_node=4)) == 16
    assert job_processes(cfg, SlurmResources(nodes=1)) == 8
    assert job_processes(load_config(ROOT / "configs" / "mnist" / "rcssr.yaml", []), SlurmResources(nodes=2)) == 1
