"""Checkpoint and resume: kill -9 mid-epoch, resume, same final metrics; preemption -> exit 42.

A training run on real Fashion-MNIST (tiny subset) is killed with SIGKILL after its first
mid-epoch checkpoint, restarted with the same command, and must finish with exactly the
metrics of an uninterrupted run: model/optimizer/schedule/RNG/statistics come from the
Accelerate state, the data position from the trainer state (mid-epoch skip), and the
augmentation of every sample from its own seed (`SeededSamples`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cssr_dist.engine.checkpoint import STATE_FILE, TrainerState, latest_checkpoint, list_checkpoints
from tests.helpers import ROOT, free_port, kill_tree, run_session
from tests.helpers import test_env as run_env

METRICS = ("closed_acc", "auroc", "aupr_in", "aupr_out", "fpr95_known_pos", "fpr95_ood_pos", "oscr", "macro_f1")
# 540 training images / batch 16 = 33 steps per epoch; checkpoints every 5 steps.
TINY = ["--config", "configs/smoke.yaml", "data.train_per_class=100", "data.test_per_class=20",
        "data.stats_per_class=20", "data.batch_size=16", "data.num_workers=0", "run.deterministic=true",
        "run.checkpoint_every_steps=5", "run.keep_last=2", "run.progress=false", "eval.test_interval=0",
        "schedule.epochs=2", "tracking.log_every=10"]
STEPS_PER_EPOCH = 33


def _train_cmd(tmp: Path, name: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *TINY, f"run.output_dir={tmp / 'runs'}", f"run.name={name}"]


def _run(tmp: Path, name: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return run_session(_train_cmd(tmp, name), run_env(tmp), timeout)


def _kill_after_first_checkpoint(tmp: Path, name: str, timeout: float = 180) -> int:
    """Start training, SIGKILL it as soon as a checkpoint exists; the process's return code."""
    ckpts = tmp / "runs" / name / "checkpoints"
    log = open(tmp / f"{name}.killed.log", "w")
    proc = subprocess.Popen(_train_cmd(tmp, name), cwd=ROOT, env=run_env(tmp), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not list_checkpoints(ckpts):
            assert proc.poll() is None, (tmp / f"{name}.killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # kill -9: no handler, no cleanup, maybe mid-write
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        log.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    t0 = time.monotonic()
    full = _run(tmp, "full")
    assert full.returncode == 0, full.stderr[-3000:]
    t1 = time.monotonic()
    killed_rc = _kill_after_first_checkpoint(tmp, "killed")
    state_at_kill = json.loads((latest_checkpoint(tmp / "runs" / "killed" / "checkpoints") / STATE_FILE).read_text())
    wandb_at_kill = sorted(p.name for p in (tmp / "runs" / "killed" / "wandb").glob("offline-run-*"))
    resumed = _run(tmp, "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    print(f"uninterrupted {t1 - t0:.1f} s, killed + resumed {time.monotonic() - t1:.1f} s")
    return dict(tmp=tmp, full=tmp / "runs" / "full", killed=tmp / "runs" / "killed", killed_rc=killed_rc,
                state_at_kill=state_at_kill, wandb_at_kill=wandb_at_kill, resumed=resumed)


@pytest.mark.slow
def test_killed_mid_epoch_after_a_checkpoint(runs):
    assert runs["killed_rc"] == -signal.SIGKILL
    state = runs["state_at_kill"]
    assert state["epoch"] == 0 and 0 < state["step_in_epoch"] < STEPS_PER_EPOCH, state  # mid-epoch
    assert state["global_step"] % 5 == 0 and not state["finished"]
    where = f"in epoch 1/2 at step {state['step_in_epoch']}/{STEPS_PER_EPOCH}"  # epochs from 1, as the epoch lines
    assert f"resuming killed from step_{state['global_step']:09d} (step {state['global_step']}: {where})" \
        in runs["resumed"].stdout


@pytest.mark.slow
def test_resumed_run_ends_with_the_uninterrupted_metrics(runs):
    full = json.loads((runs["full"] / "summary.json").read_text())
    resumed = json.loads((runs["killed"] / "summary.json").read_text())
    for key in METRICS:
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key
    for name in ("msp", "energy"):
        assert resumed["baselines"][name]["auroc"] == pytest.approx(full["baselines"][name]["auroc"], abs=1e-6)
    assert resumed["epochs"] == full["epochs"] == 2


@pytest.mark.slow
def test_resumed_history_matches_including_the_interrupted_epoch(runs):
    rows = lambda d: [json.loads(x) for x in (d / "history.jsonl").read_text().splitlines()]  # noqa: E731
    full, resumed = rows(runs["full"]), rows(runs["killed"])
    # The killed run wrote no history row before dying (it died inside epoch 1).
    assert [r["epoch"] for r in resumed] == [r["epoch"] for r in full] == [1, 2]
    for a, b in zip(full, resumed):
        assert b["step"] == a["step"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)  # over all 33 steps
        assert b["val_acc"] == a["val_acc"] and b["lr"] == pytest.approx(a["lr"], rel=1e-9)


@pytest.mark.slow
def test_checkpoints_pruned_and_wandb_run_continued(runs):
    ckpts = runs["killed"] / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["best", "step_000000065", "step_000000066"]  # keep_last=2: step 65 (every 5) and the end
    final = TrainerState(**json.loads((ckpts / f"step_{2 * STEPS_PER_EPOCH:09d}" / STATE_FILE).read_text()))
    assert final.finished and final.wandb_run_id == runs["state_at_kill"]["wandb_run_id"]
    # The resumed process logged into the same W&B run id (offline folders end with -<id>).
    ids = {p.name.rsplit("-", 1)[1] for p in (runs["killed"] / "wandb").glob("offline-run-*")}
    assert ids == {final.wandb_run_id}
    assert len(list((runs["killed"] / "wandb").glob("offline-run-*"))) == len(runs["wandb_at_kill"]) + 1


def test_incomplete_checkpoint_folders_are_ignored(tmp_path):
    """A checkpoint is complete once renamed with its trainer state; anything else is skipped."""
    root = tmp_path / "checkpoints"
    (root / "step_000000005").mkdir(parents=True)
    (root / "step_000000005" / STATE_FILE).write_text("{}")
    (root / ".tmp_step_000000010").mkdir()        # killed while saving
    (root / ".tmp_step_000000010" / STATE_FILE).write_text("{}")
    (root / "step_000000015").mkdir()             # no trainer state: not complete
    assert latest_checkpoint(root).name == "step_000000005"


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_42_and_the_rerun_completes(tmp_path):
    """Preemption through launchers/launch.py (what the Slurm scripts run), 2 CPU processes."""
    env = run_env(tmp_path)
    env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, str(ROOT / "launchers" / "launch.py"), "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "train.py"), *TINY, f"run.output_dir={tmp_path / 'runs'}",
           "run.name=pre", "tracking.log_every=1", "schedule.epochs=1"]
    ckpts = tmp_path / "runs" / "pre" / "checkpoints"
    with open(tmp_path / "pre.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not list_checkpoints(ckpts) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGUSR1)  # to the launcher: forwarded to both workers
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                kill_tree(proc)
    text = (tmp_path / "pre.log").read_text()
    assert rc == 42, text[-3000:]
    assert "checkpoint written, exiting for requeue" in text
    state = json.loads((latest_checkpoint(ckpts) / STATE_FILE).read_text())
    assert 0 < state["step_in_epoch"] < 16 and not state["finished"]  # 540 images / (2 x 16) = 16 steps
    again = run_session(cmd, env, 240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"from step_{state['global_step']:09d}" in again.stdout
    summary = json.loads((tmp_path / "runs" / "pre" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 1
    assert not list(tmp_path.glob("torchelastic_*")) and not list(tmp_path.glob("cssr-launch-*"))  # TMPDIR clean
