"""The reliability faults through train.py itself (tiny Fashion-MNIST runs, CPU).

A rerun over a finished run and a resume with a changed config must leave the run folder
byte-identical; SIGTERM to the process group of a run with 2 DataLoader workers and to the
launcher of a 2-process run must end in a checkpoint, exit 42, and a resume that finishes.
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

from tests.helpers import ROOT, finish_session, free_port, run_session
from tests.helpers import test_env as run_env

TINY = ["--config", str(ROOT / "configs" / "smoke.yaml"), "data.train_per_class=20", "data.test_per_class=5",
        "data.stats_per_class=5", "data.batch_size=16", "schedule.epochs=2", "run.progress=false",
        "tracking.wandb=false", "data.ood=[]", "eval.test_interval=0", f"data.root={ROOT / 'data'}"]

def train(tmp: Path, *args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, f"run.output_dir={tmp / 'runs'}", *args]
    return run_session(cmd, {**run_env(tmp), **(env or {})}, timeout)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_rerun_over_a_finished_run_changes_nothing_and_test_writes_only_its_summary(tmp_path):
    first = train(tmp_path, "run.name=done")
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "done"
    before = digest(run)
    again = train(tmp_path, "run.name=done")
    assert again.returncode == 2 and "holds a finished run" in again.stderr, again.stderr[-2000:]
    assert digest(run) == before
    other_data = train(tmp_path, "run.name=done", "data.train_per_class=10")
    assert other_data.returncode == 2 and "another config" in other_data.stderr
    assert digest(run) == before
    # --test with overrides after the flag: only summary_test.json (and its plots) are new
    tested = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "--test", "run.name=done",
                             f"run.output_dir={tmp_path / 'runs'}"], cwd=ROOT, env=run_env(tmp_path),
                            capture_output=True, text=True, timeout=240)
    assert tested.returncode == 0, tested.stderr[-3000:]
    after = digest(run)
    assert {k: after[k] for k in before} == before
    assert all(k == "summary_test.json" or k.startswith("plots/restored") for k in set(after) - set(before))
    assert "summary_test.json" in after


def test_resume_with_a_changed_config_is_refused_before_anything_is_written(tmp_path):
    killed = train(tmp_path, "run.name=r", "run.checkpoint_every_steps=3",
                   env={"CSSR_FAIL_RANK": "0", "CSSR_FAIL_STEP": "8", "CSSR_FAIL_MODE": "exit"})
    assert killed.returncode == 13, killed.stderr[-3000:]
    run = tmp_path / "runs" / "r"
    before = digest(run)
    for change in ("model.latent_dim=16", "optim.lr=0.05"):  # smoke.yaml: 32 and 0.1
        refused = train(tmp_path, "run.name=r", "run.checkpoint_every_steps=3", change)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "was trained with another config" in refused.stderr and "run.force_resume=true" in refused.stderr
        assert digest(run) == before, change
    resumed = train(tmp_path, "run.name=r", "run.checkpoint_every_steps=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    assert (run / "environment_resume_1.json").is_file()
    assert digest(run)["config.yaml"] == before["config.yaml"]  # the first start's config stays


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not list((run / "checkpoints").glob("step_*")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.3)


LONG = ["data.train_per_class=400", "schedule.epochs=3", "tracking.log_every=2", "run.checkpoint_every_steps=4"]


@pytest.mark.timeout(300)
def test_sigterm_to_the_process_group_with_2_dataloader_workers(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, *LONG, "data.num_workers=2", "run.name=g",
           f"run.output_dir={tmp_path / 'runs'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    run = tmp_path / "runs" / "g"
    _wait_for_checkpoint(run, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # Slurm's time limit / scancel / preemption
    code, err = finish_session(proc, 60)
    assert code == 42, err[-3000:]
    state = json.loads(sorted((run / "checkpoints").glob("step_*"))[-1].joinpath("trainer_state.json").read_text())
    assert not state["finished"] and state["global_step"] >= 4
    resumed = train(tmp_path, *LONG, "data.num_workers=2", "run.name=g", timeout=280)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step_{state['global_step']:09d}" in resumed.stdout + resumed.stderr


@pytest.mark.timeout(300)
def test_sigterm_to_the_launcher_of_a_2_process_run(tmp_path):
    cmd = [sys.executable, str(ROOT / "launchers" / "launch.py"), "--config_file",
           str(ROOT / "launchers" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
           str(ROOT / "train.py"), *TINY, *LONG, "run.name=l", f"run.output_dir={tmp_path / 'runs'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**run_env(tmp_path), "ACCELERATE_USE_CPU": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_checkpoint(tmp_path / "runs" / "l", proc, seconds=180)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher only, as srun / a scheduler would
    code, err = finish_session(proc, 90)
    assert code == 42, err[-3000:]
