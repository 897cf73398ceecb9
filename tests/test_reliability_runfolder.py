"""A run folder is never silently overwritten: fingerprints, start checks, the lock.

Faults as a cluster user makes them: the same run.name again over a finished or trained
run, a resume with a changed latent_dim or lr, two jobs started into one folder, a job
killed with -9 that held the lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cssr_dist.config import Config
from cssr_dist.engine.checkpoint import TrainerState
from cssr_dist.errors import ConfigError, DataError
from cssr_dist.engine.run_folder import RunFolder, config_fingerprint
from tests.helpers import ROOT


def cfg_in(tmp: Path, **changes) -> Config:
    cfg = Config()
    cfg.run.output_dir, cfg.run.name = str(tmp), "r1"
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def fake_checkpoint(folder: RunFolder, step: int, **state) -> Path:
    path = folder.checkpoints / f"step_{step:09d}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, **state}))
    return path


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_fingerprint_covers_what_trains_and_ignores_where_and_how_fast(tmp_path):
    base = config_fingerprint(cfg_in(tmp_path))
    same = cfg_in(tmp_path, run__name="other", data__num_workers=9, data__root="/elsewhere", tracking__wandb=False,
                  eval__test_interval=5, run__max_steps=3, model__compile=True)
    assert config_fingerprint(same) == base
    for change in ({"model__latent_dim": 32}, {"optim__lr": 0.1}, {"run__seed": 1}, {"schedule__epochs": 9},
                   {"data__train_per_class": 5}, {"data__batch_size": 64}, {"model__head": "pcssr"}):
        assert config_fingerprint(cfg_in(tmp_path, **change)) != base, change
    split_a, split_b = tmp_path / "a.json", tmp_path / "b.json"
    split_a.write_text('{"known": [0, 1]}')
    split_b.write_text('{"known": [0, 1]}')
    assert config_fingerprint(cfg_in(tmp_path, data__split_file=str(split_a))) == \
        config_fingerprint(cfg_in(tmp_path, data__split_file=str(split_b)))  # by content, not path
    split_b.write_text('{"known": [0, 2]}')
    assert config_fingerprint(cfg_in(tmp_path, data__split_file=str(split_a))) != \
        config_fingerprint(cfg_in(tmp_path, data__split_file=str(split_b)))


def test_fresh_resume_and_refusals(tmp_path):
    cfg = cfg_in(tmp_path)
    folder, fp = RunFolder(cfg), config_fingerprint(cfg)
    assert folder.check_training_start(cfg, fp) == "fresh"
    fake_checkpoint(folder, 10, fingerprint=fp)
    assert folder.check_training_start(cfg, fp) == "resume"
    changed = cfg_in(tmp_path, model__latent_dim=32)
    with pytest.raises(ConfigError, match=r"step_000000010 was trained with another config .*run.force_resume=true"):
        folder.check_training_start(changed, config_fingerprint(changed))
    changed.run.force_resume = True
    assert folder.check_training_start(changed, config_fingerprint(changed)) == "resume"


@pytest.mark.parametrize("left", ["best", "summary", "history"])
def test_a_fresh_start_over_a_trained_run_is_refused(tmp_path, left):
    cfg = cfg_in(tmp_path)
    folder = RunFolder(cfg)
    if left == "best":
        (folder.checkpoints / "best").mkdir(parents=True)
    elif left == "summary":
        folder.path.mkdir(parents=True)
        (folder.path / "summary.json").write_text("{}")
    else:
        folder.path.mkdir(parents=True)
        (folder.path / "history.jsonl").write_text('{"epoch": 1}\n')
    before = digest(tmp_path)
    with pytest.raises(ConfigError, match=r"holds a trained run .* no checkpoint to resume; choose another run.name"):
        folder.check_training_start(cfg, config_fingerprint(cfg))
    assert digest(tmp_path) == before


def test_rerun_over_a_finished_run_is_refused_and_touches_nothing(tmp_path):
    cfg = cfg_in(tmp_path)
    folder = RunFolder(cfg)
    fake_checkpoint(folder, 20, fingerprint=config_fingerprint(cfg), finished=True)
    folder.write_start_records(cfg, {"seed": 0}, "fresh")
    folder.write_summary({"auroc": 0.9})
    before = digest(tmp_path)
    with pytest.raises(ConfigError, match="holds a finished run .*evaluate it with --test"):
        folder.check_training_start(cfg, config_fingerprint(cfg))
    # finished but its final evaluation never wrote summary.json (preempted there): resume to finish it
    (folder.path / "summary.json").unlink()
    assert folder.check_training_start(cfg, config_fingerprint(cfg)) == "resume"
    assert set(before) - set(digest(tmp_path)) == {"r1/summary.json"}


def test_test_needs_best_and_resume_records_do_not_rewrite_config(tmp_path):
    cfg = cfg_in(tmp_path)
    folder = RunFolder(cfg)
    with pytest.raises(DataError, match=r"has no best checkpoint .*train the run first"):
        folder.check_test_start()
    folder.write_start_records(cfg, {"seed": 0}, "fresh")
    config_yaml = (folder.path / "config.yaml").read_bytes()
    env = (folder.path / "environment.json").read_bytes()
    cfg.data.num_workers = 5
    assert folder.write_start_records(cfg, {"seed": 0}, "resume").name == "environment_resume_1.json"
    assert folder.write_start_records(cfg, {"seed": 0}, "resume").name == "environment_resume_2.json"
    assert (folder.path / "config.yaml").read_bytes() == config_yaml and (folder.path / "environment.json").read_bytes() == env
    assert json.loads((folder.path / "environment_resume_2.json").read_text())["config"]["data"]["num_workers"] == 5
    folder.rewrite_history([{"epoch": 1}, {"epoch": 2}])
    assert (folder.path / "history.jsonl").read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from cssr_dist.config import Config
from cssr_dist.engine.run_folder import RunFolder
cfg = Config(); cfg.run.output_dir, cfg.run.name = {out!r}, "r1"
RunFolder(cfg).lock()
print("locked", flush=True)
time.sleep(60)
"""


def test_two_jobs_cannot_train_into_one_run_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), out=str(tmp_path))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        folder = RunFolder(cfg_in(tmp_path))
        with pytest.raises(ConfigError, match=rf"is in use by another job \(pid {holder.pid} on .*\); wait for it"):
            folder.lock()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # kill -9: the kernel releases the lock, no stale lock file blocks
        holder.wait(timeout=10)
    deadline = time.monotonic() + 5
    folder = RunFolder(cfg_in(tmp_path))
    folder.lock()
    assert time.monotonic() < deadline
    assert (folder.path / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    folder.unlock()


def test_resume_state_carries_the_fingerprint(tmp_path):
    state = TrainerState.from_json(json.dumps({"global_step": 3, "fingerprint": "abc", "unknown_future_field": 1}))
    assert (state.global_step, state.fingerprint) == (3, "abc")


def test_mistyped_data_root_is_said_and_recorded_not_silent(tmp_path, caplog):
    """A data.root without the set falls back to the built-in Fashion-MNIST (a fresh machine
    needs no data folder), but never silently: one warning names the typo and the folder read,
    and the folder read is what the run records (counts.source in summary.json)."""
    import logging

    from cssr_dist.data import builtin_data
    from cssr_dist.data.sources import build_source

    typo = tmp_path / "datsets"
    with caplog.at_level(logging.WARNING, logger="cssr_dist.data.builtin_data"):
        source = build_source("fashion_mnist", str(typo), train=False)
    assert f"data.root {typo} does not exist; reading the built-in copy at" in caplog.text
    assert source.origin == str(builtin_data.find_fashion_mnist(typo, False)) and not source.origin.startswith(str(typo))
    assert len(source) == 10000
