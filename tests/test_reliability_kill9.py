"""kill -9 at random moments, several times, each resumed: the run ends as if never interrupted.

ONE shared end-to-end case (CI time): a tiny deterministic run is trained once without
interruption; the same run is then started TRIALS times and SIGKILLed (the whole process
group, as the OOM killer or a node failure would) after a seeded random delay of 15-60 % of the
uninterrupted run's wall time (so no attempt can finish on its own), landing in start-up, steps,
checkpoint writes, validation, `best/` writes or the final evaluation; a last start finishes it. The final summary's metrics,
the history and `best/` (weights and statistics, tensor by tensor) must equal the
uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import ROOT, run_session
from tests.helpers import test_env as run_env

TRIALS = 3
SEED = 20
# 300 training images / batch 16 = 19 steps per epoch, 2 epochs, a checkpoint every 4 steps
TINY = ["--config", "configs/smoke.yaml", "data.train_per_class=50", "data.test_per_class=10",
        "data.stats_per_class=10", "data.batch_size=16", "data.num_workers=0", "run.deterministic=true",
        "run.checkpoint_every_steps=4", "run.keep_last=2", "run.progress=false", "eval.test_interval=0",
        "schedule.epochs=2", "tracking.log_every=5", "data.ood=[]", f"data.root={ROOT / 'data'}"]
METRICS = ("closed_acc", "auroc", "aupr_in", "aupr_out", "oscr", "macro_f1", "epochs", "best_epoch")


def _cmd(tmp: Path, name: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *TINY, f"run.output_dir={tmp / 'runs'}", f"run.name={name}"]


def _kill_after(tmp: Path, name: str, seconds: float) -> int | None:
    """Start the run and SIGKILL its process group after `seconds`; None if it finished first."""
    with open(tmp / f"{name}.log", "a") as log:
        proc = subprocess.Popen(_cmd(tmp, name), cwd=ROOT, env=run_env(tmp), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=seconds)
            return None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait(timeout=60)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    start = time.monotonic()
    full = run_session(_cmd(tmp_path, "full"), run_env(tmp_path), 300)
    assert full.returncode == 0, full.stderr[-3000:]
    wall = time.monotonic() - start
    rng = random.Random(SEED)
    kills = []
    for _ in range(TRIALS):
        delay = rng.uniform(0.15, 0.6) * wall  # each attempt is killed before it can finish the run
        rc = _kill_after(tmp_path, "killed", delay)
        kills.append((round(delay, 1), rc))
        if rc is None:  # it finished before the kill
            break
    print(f"uninterrupted {wall:.1f} s; kills (delay s, exit): {kills}")
    assert sum(rc == -signal.SIGKILL for _, rc in kills) >= 2, kills
    if kills[-1][1] is not None:
        last = run_session(_cmd(tmp_path, "killed"), run_env(tmp_path), 300)
        assert last.returncode == 0, (tmp_path / "killed.log").read_text()[-3000:] + last.stderr[-3000:]
    runs = tmp_path / "runs"
    a, b = (json.loads((runs / n / "summary.json").read_text()) for n in ("full", "killed"))
    for key in METRICS:
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    rows = lambda n: [json.loads(x) for x in (runs / n / "history.jsonl").read_text().splitlines()]  # noqa: E731
    assert [(r["epoch"], r["step"], r["val_acc"]) for r in rows("killed")] == \
        [(r["epoch"], r["step"], r["val_acc"]) for r in rows("full")]
    best_a, best_b = (load_file(str(runs / n / "checkpoints" / "best" / "weights.safetensors")) for n in ("full", "killed"))
    assert best_a.keys() == best_b.keys()
    assert all(best_a[k].equal(best_b[k]) for k in best_a), [k for k in best_a if not best_a[k].equal(best_b[k])]
