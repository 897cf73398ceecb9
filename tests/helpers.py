"""Launch helpers for tests that start real processes (Accelerate launches, train.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from cssr_dist.stacks import STACK_SIGNAL

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_env(tmp_path: Path) -> dict[str, str]:
    """Offline, quiet, and torchelastic's scratch dirs inside tmp_path."""
    env = dict(os.environ)
    # an in-process W&B run of an earlier test leaves WANDB_SERVICE (its service's address) in this
    # process's environment; a launched run must start its own service, as a user's run does
    env.pop("WANDB_SERVICE", None)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def launch_train(tmp_path: Path, args: list[str], processes: int = 2, timeout: int = 300,
                 extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch train.py ...` with N CPU processes over gloo, under a hard timeout."""
    env = test_env(tmp_path)
    env.update(extra_env or {})
    cmd = [str(VENV_BIN / "accelerate"), "launch"]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd += ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                "--main_process_port", str(free_port())]
    else:
        cmd += ["--cpu", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train.py"), *args]
    return run_session(cmd, env, timeout)


class LaunchTimedOut(subprocess.TimeoutExpired):
    """A launch past its deadline. Its message carries the tails of stdout and of stderr (where
    each process printed its stack), because pytest's report shows the message, not `.stderr`."""

    def __str__(self) -> str:
        return (f"{super().__str__()}\n--- stdout (tail) ---\n{(self.output or '')[-3000:]}\n"
                f"--- stderr (tail: each process's stack) ---\n{(self.stderr or '')[-12000:]}")


def run_session(cmd: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own: on timeout every process of the launch is killed
    (`kill_tree`), so a hung launch cannot leave its ranks and data workers running under later
    tests, and the error carries each rank's stack (`STACK_SIGNAL`)."""
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            stdout, stderr = proc.communicate(timeout=60)
            raise LaunchTimedOut(cmd, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def finish_session(proc: subprocess.Popen, seconds: float = 60) -> tuple[int, str]:
    """Wait for a process started in its own session; fail the test (killing every process of
    it, `kill_tree`) when it does not stop within `seconds`. Returns (exit code, stderr)."""
    try:
        _, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"did not stop within {seconds} s: {err[-12000:]}")
    return proc.returncode, err


def kill_tree(proc: subprocess.Popen, stack_wait_s: float = 0.3) -> None:
    """SIGKILL a launch and every process below it (also when the launch leads no session).

    Why not only `os.killpg(proc.pid)`: torchrun (inside `accelerate launch`) starts each rank
    in a session of its own, so the launcher's group holds the launcher only. The ranks and
    their data workers survived the group's SIGKILL, kept the test's pipes open (communicate()
    then waited for ever) and ran on under later tests. So the whole tree is listed first, each
    process below the launcher is asked for its stack (train.py prints every thread's on
    `STACK_SIGNAL`), and then every process group in the tree is killed (a rank's data workers
    share its group, also when the rank dies first).
    """
    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    for child in below:  # one at a time: faulthandler writes each line in pieces, which would interleave
        with contextlib.suppress(psutil.Error):
            child.send_signal(STACK_SIGNAL)
            time.sleep(stack_wait_s)
    groups = {proc.pid}
    for child in below:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if child.is_running():  # the same process, not a reused pid
                groups.add(os.getpgid(child.pid))
    groups.discard(os.getpgrp())  # never the test's own group
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    for child in below:  # one that left its group is still in the list
        with contextlib.suppress(psutil.Error):
            child.kill()
    proc.wait(timeout=60)


def leftover_processes(marker: str, grace_s: float = 15.0) -> list[str]:
    """Command lines of live processes that name `marker` (a test's tmp_path) in their command
    line or environment (`test_env` puts tmp_path in TMPDIR), after waiting up to `grace_s` for
    them to end. The environment: data loader workers start from a fork server, and their
    command line names no run. The wait: an orphaned worker ends at its next liveness check."""
    deadline = time.monotonic() + grace_s
    while True:
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes()
                environ = (proc / "environ").read_bytes()
            except OSError:
                continue
            if int(proc.name) != os.getpid() and (marker.encode() in cmdline or marker.encode() in environ):
                found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def write_imagenet_tree(root: Path, wnids: list[str], per_class: int = 12, val_per_class: int = 4,
                        ood: dict[str, tuple[int | None, int]] | None = None, size: tuple[int, int] = (40, 48)) -> dict[str, Path]:
    """A tiny ImageNet layout of real JPEG files: train/<wnid>/*.JPEG, a flat val/ with a
    'filename wnid' ground-truth file (val_labels.txt), and one flat folder per OOD set.

    Images are a class colour plus noise, so a few steps can learn the classes. `ood` maps a
    set name to (colour class, count): a known class's colour makes a NEAR set (looks like a
    known class), None a FAR one (pure noise). Returns the paths by name (train, val, labels, <ood names>).
    """
    def jpeg(path: Path, cls: int | None, seed: int) -> None:
        rng = np.random.default_rng(seed)
        if cls is None:
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        else:
            base = np.zeros((*size, 3), np.uint8) + np.array([60 * cls, 255 - 60 * cls, 40 * (cls % 2)], np.uint8)
            pixels = base + rng.integers(0, 40, base.shape, dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)

    paths = {"train": root / "train", "val": root / "val", "labels": root / "val_labels.txt"}
    lines, n = [], 0
    for c, wnid in enumerate(wnids):
        for i in range(per_class):
            jpeg(paths["train"] / wnid / f"{wnid}_{i}.JPEG", c, 1000 * c + i)
        for _ in range(val_per_class):
            n += 1
            name = f"ILSVRC2012_val_{n:08d}.JPEG"
            jpeg(paths["val"] / name, c, 50000 + n)
            lines.append(f"{name} {wnid}\n")
    paths["labels"].write_text("".join(lines))
    for k, (name, (cls, count)) in enumerate((ood or {}).items()):
        paths[name] = root / name
        for i in range(count):
            jpeg(paths[name] / f"{name}_{i}.jpg", cls, 90000 + 1000 * k + i)
    return paths


def png_folder_tree(root: Path, classes: int = 3, per_class: int = 10) -> Path:
    """root/{train,val}/class_<c>/<i>.png: real 16 px PNGs of seeded noise (an ImageFolder layout)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root
