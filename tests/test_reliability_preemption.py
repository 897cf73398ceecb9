"""Preemption as Slurm delivers it: SIGTERM to the whole process group (DataLoader workers
included) and SIGTERM to the launcher of a 2-process run.

The worker script stands in for train.py's preemption path (flag -> finish the step ->
checkpoint -> exit 42 with the launcher's marker) so the launcher and DataLoader
mechanics are tested on their own, in seconds; tests/test_reliability_e2e.py runs the
same faults through train.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port
from tests.helpers import finish_session as finish
from tests.helpers import test_env as run_env

WORKER = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
from torch.utils.data import DataLoader
from cssr_dist.distributed import ignore_stop_signals
from cssr_dist.engine.preemption import PreemptionFlag, mark_preempted, REQUEUE_EXIT_CODE

class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 10 ** 6
    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.tensor([float(i)])

out = Path({out!r})
acc = None
if os.environ.get("WORLD_SIZE"):
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
rank = acc.process_index if acc else 0
flag = PreemptionFlag()
init = ignore_stop_signals if {ignore} else None
loader = DataLoader(Slow(), batch_size=4, num_workers={workers}, worker_init_fn=init, persistent_workers={workers} > 0)
(out / f"ready.{{rank}}").write_text(str(os.getpid()))
for step, batch in enumerate(loader):
    stop = flag.should_stop(acc) if acc else flag.requested
    if stop:
        time.sleep(1.0)  # the checkpoint write
        (out / f"checkpoint.{{rank}}").write_text(str(step))
        mark_preempted()
        sys.exit(REQUEUE_EXIT_CODE)
"""


def worker_script(tmp: Path, workers: int, ignore: bool = True) -> Path:
    script = tmp / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), out=str(tmp), workers=workers, ignore=ignore))
    return script


def wait_for(paths: list[Path], proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.2)
    time.sleep(1.0)  # DataLoader workers running


def start(cmd: list[str], tmp: Path, **env) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env={**run_env(tmp), **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_the_process_group_with_2_dataloader_workers_checkpoints_and_exits_42(tmp_path, sig):
    proc = start([sys.executable, str(worker_script(tmp_path, workers=2))], tmp_path)
    wait_for([tmp_path / "ready.0"], proc)
    os.killpg(proc.pid, sig)  # what Slurm's time limit, scancel and preemption do
    code, err = finish(proc)
    assert code == 42, err[-2000:]
    assert (tmp_path / "checkpoint.0").exists()


def test_control_without_ignoring_in_workers_the_run_dies_without_checkpoint(tmp_path):
    """The fault is real: torch's worker handler lets SIGTERM kill the workers first."""
    proc = start([sys.executable, str(worker_script(tmp_path, workers=2, ignore=False))], tmp_path)
    wait_for([tmp_path / "ready.0"], proc)
    os.killpg(proc.pid, signal.SIGTERM)
    code, err = finish(proc)
    assert code == 1 and "DataLoader worker (pid" in err and not (tmp_path / "checkpoint.0").exists()


def launcher_cmd(script: Path) -> list[str]:
    return [sys.executable, str(ROOT / "launchers" / "launch.py"), "--config_file",
            str(ROOT / "launchers" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()), str(script)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", ["launcher", "group"])
def test_sigterm_to_the_launcher_of_a_2_process_run_exits_42(tmp_path, target):
    proc = start(launcher_cmd(worker_script(tmp_path, workers=1)), tmp_path, ACCELERATE_USE_CPU="1")
    wait_for([tmp_path / "ready.0", tmp_path / "ready.1"], proc, seconds=90)
    if target == "launcher":
        os.kill(proc.pid, signal.SIGTERM)  # torchrun would make this 143 and SIGKILL the workers after 30 s
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    code, err = finish(proc, 90)
    assert code == 42, err[-3000:]
    assert (tmp_path / "checkpoint.0").exists() and (tmp_path / "checkpoint.1").exists()
