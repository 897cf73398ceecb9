"""A user error on ONE rank of a multi-process run (issues 19 and 20): the user sees that rank's
`error:` line first and alone, every rank stops, and the launch exits non-zero.

Before: the failing rank's line was followed by the other rank's 40-line gloo traceback
("Connection closed by peer"), torchrun's log lines and Accelerate's `ChildFailedError`
traceback (and a config error printed one `error:` line per rank). Now the first erring rank
announces its error in torchrun's agent store (`distributed.claim_first_error`), the others
exit 2 quietly (`peer_failed_first`), and `launchers/launch.py` ends the launch with exit 2
and nothing after the line. Real 2-process launches on CPU (gloo), through `launchers/launch.py`.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cssr_dist.data.sources import build_source
from cssr_dist.engine.checkpoint import list_checkpoints
from cssr_dist.engine.preemption import REQUEUE_EXIT_CODE
from cssr_dist.errors import USER_ERROR_EXIT
from tests.helpers import ROOT, free_port, png_folder_tree, run_session
from tests.helpers import test_env as run_env
from tests.test_reliability_disk import _mount, fill

# A 3-class folder data set of 16x16 PNGs (seconds to train), two known classes, no OOD sets.
FOLDER_RUN = ["data.dataset=imagefolder", "data.split_family=none", "data.known=[0,1]", "data.image_size=16",
              "data.in_chans=3", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "data.train_augment=none",
              "data.batch_size=8", "data.eval_batch_size=8", "data.num_workers=0", "data.val_fraction=0",
              "data.ood=[]", "model.latent_dim=4", "schedule.epochs=1", "schedule.warmup_epochs=0",
              "tracking.wandb=false", "run.progress=false"]


def launch_2(tmp_path: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python launchers/launch.py` (the documented multi-process command) with 2 CPU processes."""
    cmd = [sys.executable, str(ROOT / "launchers" / "launch.py"), "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "train.py"), *FOLDER_RUN, *args]
    return run_session(cmd, {**run_env(tmp_path), "ACCELERATE_USE_CPU": "1"}, timeout)


def assert_one_line_alone(out: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit 2, exactly one `error:` line holding `expected`, nothing after it, no traceback anywhere."""
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-4000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text[-4000:]
    assert all(part in errors[0] for part in expected), errors[0]
    assert "Traceback" not in text and "ChildFailedError" not in text and "Connection closed" not in text, text[-4000:]
    assert out.stderr.rstrip().endswith(errors[0]), out.stderr[-2000:]  # the launcher adds nothing after it
    return errors[0]


@pytest.mark.slow
def test_an_unreadable_image_on_rank_1_only_is_one_line_and_no_traceback(tmp_path):
    root = png_folder_tree(tmp_path / "data")
    bad = root / "val" / "class_0" / "1.png"
    # evaluation gives rank r the samples r, r+2, ... (data.readers.native.eval_loader): rank 1 alone reads it
    assert build_source("imagefolder", root, train=False).paths.index(str(bad)) % 2 == 1
    bad.write_bytes(bad.read_bytes()[:40])
    out = launch_2(tmp_path, f"data.root={root}", f"run.output_dir={tmp_path / 'runs'}", "run.name=rank1")
    assert_one_line_alone(out, str(bad), "replace or remove the file")


@pytest.mark.slow
def test_a_full_disk_on_rank_0_stops_every_rank_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """A step checkpoint is ~2.6 MB (model, momentum, statistics). With ~4 MB free the first one
    fits; the second, written beside it before the first is removed, does not: rank 0 (which
    writes the shared files) gets ENOSPC, rank 1 (its own RNG file written) learns it in the
    checkpoint's collective and stays quiet. Before, either rank's line could come first, and
    rank 1's only said "a write failed on another rank"."""
    disk = tmp_path / "disk"
    _mount(disk, "16m")
    try:
        fill(disk, 4_000_000)
        root = png_folder_tree(tmp_path / "data")
        out = launch_2(tmp_path, f"data.root={root}", f"run.output_dir={disk / 'runs'}", "run.name=full",
                       "data.batch_size=4", "run.checkpoint_every_steps=1", "run.keep_last=1")  # 3 steps
        checkpoints = disk / "runs" / "full" / "checkpoints"
        assert_one_line_alone(out, f"cannot write checkpoint step_000000002 in {checkpoints}: No space left on device "
                                   "(ENOSPC)", "MB free there", "rerun the same command")
        kept = list_checkpoints(checkpoints)
        assert [p.name for p in kept] == ["step_000000001"], sorted(p.name for p in checkpoints.iterdir())
        assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp_")]
        assert load_file(str(kept[0] / "model.safetensors"))  # complete: it parses
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture
def agent_store(monkeypatch):
    """A TCPStore standing in for torchrun's agent store, and the environment torchrun gives a worker."""
    import torch.distributed as dist

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    yield store


def test_the_first_user_error_of_a_job_is_printed_once_and_its_echoes_are_quiet(agent_store, monkeypatch, capsys):
    from cssr_dist import cli
    from cssr_dist.cli import quiet_after_a_peer_error, report_once
    from cssr_dist.distributed import peer_failed_first
    from cssr_dist.errors import ConfigError, FailedOnAnotherRank

    assert not peer_failed_first()
    with pytest.raises(RuntimeError, match="Connection closed"):  # a crash with no user error before it: re-raised
        quiet_after_a_peer_error(RuntimeError("Connection closed by peer"))
    assert report_once(ConfigError("bad key")) == 2  # the first rank: prints
    assert report_once(ConfigError("bad key")) == 2  # the same error on the next rank: quiet
    assert report_once(FailedOnAnotherRank("a write failed on another rank")) == 2  # an echo: quiet at once
    assert capsys.readouterr().err == "error: bad key\n"
    assert peer_failed_first() and quiet_after_a_peer_error(RuntimeError("Connection closed by peer")) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarted the workers: a new attempt
    assert not peer_failed_first()
    assert report_once(ConfigError("bad key")) == 2 and capsys.readouterr().err == "error: bad key\n"
    # an echo whose cause never speaks (that rank crashed): said after the wait
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    monkeypatch.setattr(cli, "PEER_LINE_WAIT_S", 0.2)
    assert report_once(FailedOnAnotherRank("a write failed on another rank")) == 2
    assert capsys.readouterr().err == "error: a write failed on another rank\n"


def test_without_torchrun_every_process_prints_its_own_error(monkeypatch, capsys):
    from cssr_dist.cli import report_once
    from cssr_dist.errors import ConfigError, FailedOnAnotherRank

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert report_once(ConfigError("a")) == 2 and report_once(FailedOnAnotherRank("b")) == 2
    assert capsys.readouterr().err == "error: a\nerror: b\n"


def test_the_launcher_exit_codes_are_the_package_s():
    """launchers/launch.py imports nothing from the package, so it keeps copies of the two exit
    codes it acts on; they are pinned here: a code changed in the package fails this test, not a
    Slurm requeue (42) or the quiet end of a user error (2)."""
    spec = importlib.util.spec_from_file_location("cssr_launch", ROOT / "launchers" / "launch.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    assert (launch.USER_ERROR_EXIT, launch.REQUEUE_EXIT_CODE) == (USER_ERROR_EXIT, REQUEUE_EXIT_CODE) == (2, 42)
