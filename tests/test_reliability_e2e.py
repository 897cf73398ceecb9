"""The reliability faults through train.py itself (tiny Fashion-MNIST runs, CPU).

A rerun over a finished run and a resume with a changed config must leave the run folder
byte-identical; SIGTERM to the process group of a run with 2 DataLoader workers and to the
launcher of a 2-process run must end in a checkpoint, exit 42, and a resume that finishes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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


def _children_named(pid: int, name: str) -> list[int]:
    """Child processes of `pid` whose command is `name` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            comm, ppid = fields[0].split("(", 1)[1], int(fields[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and comm == name:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.timeout(300)
def test_a_dead_wandb_service_costs_one_line_not_the_preemption_checkpoint(tmp_path):
    """Slurm signals every process of the step, W&B's service (own session) included: with the
    service killed first, the run still writes its preemption checkpoint, exits 42 with one
    W&B line and no traceback, and the requeued attempt resumes and finishes with W&B on."""
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, *LONG, "tracking.wandb=true", "run.name=w",
           f"run.output_dir={tmp_path / 'runs'}"]
    with open(tmp_path / "stdout.log", "w") as stdout:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(tmp_path), stdout=stdout, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    run = tmp_path / "runs" / "w"
    _wait_for_checkpoint(run, proc)
    services = _children_named(proc.pid, "wandb-core")
    assert len(services) == 1, "W&B's service process not found"
    os.kill(services[0], signal.SIGTERM)  # proctrack reaches it although it runs in its own session
    os.killpg(proc.pid, signal.SIGTERM)
    code, err = finish_session(proc, 60)
    out = (tmp_path / "stdout.log").read_text()
    assert code == 42, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    warnings = [line for line in err.splitlines() if line.startswith("W&B ") and "ConnectionResetError" in line]
    assert len(warnings) == 1 and "W&B is off for the rest of this attempt" in warnings[0], err[-3000:]
    stopped = re.search(r"preempted at step (\d+)", out + err)
    assert stopped, (out + err)[-3000:]
    assert (run / "checkpoints" / f"step_{int(stopped[1]):09d}" / "trainer_state.json").is_file()
    resumed = train(tmp_path, *LONG, "run.name=w", "tracking.wandb=true", timeout=280)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step_{int(stopped[1]):09d}" in resumed.stdout + resumed.stderr
    assert len(list((run / "wandb").glob("offline-run-*"))) >= 1


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
