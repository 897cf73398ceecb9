"""Multi-node on one machine: two Accelerate "machines" on loopback, 2 CPU processes each.

Both launches run what a cluster node runs: launchers/launch.py with
launchers/multi_node.yaml, the machine rank, rendezvous address/port and node count taken
from the environment (MACHINE_RANK, MASTER_ADDR, MASTER_PORT, NNODES), 4 processes in all.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port, kill_tree, leftover_processes
from tests.helpers import test_env as run_env

TINY = ["--config", "configs/smoke.yaml", "data.train_per_class=50", "data.test_per_class=20",
        "data.stats_per_class=20", "data.batch_size=16", "schedule.epochs=1", "eval.test_interval=0",
        "run.progress=false", "tracking.log_every=10"]
MACHINES, PER_MACHINE = 2, 2


def launch_machines(tmp: Path, name: str, extra_env: dict[str, str] | None = None,
                    timeout: float = 240) -> tuple[list[tuple[int, str, float]], float | None]:
    """Start both machines at once, poll them; [(return code, log, end time)], time of the
    CSSR_FAIL hook's message (None if none). Times in seconds from the start."""
    port = free_port()
    procs = []
    for rank in range(MACHINES):
        env = {**run_env(tmp), "ACCELERATE_USE_CPU": "1", "MACHINE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "NNODES": str(MACHINES), **(extra_env or {})}
        cmd = [sys.executable, str(ROOT / "launchers" / "launch.py"), "--config_file",
               str(ROOT / "launchers" / "multi_node.yaml"), "--num_processes", str(MACHINES * PER_MACHINE),
               "--mixed_precision", "no", str(ROOT / "train.py"), *TINY, f"run.output_dir={tmp / 'runs'}",
               f"run.name={name}"]
        log = tmp / f"{name}.machine{rank}.log"
        with open(log, "w") as fh:
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT), log))
    start, ended, failed_at = time.monotonic(), {}, None
    try:
        while len(ended) < len(procs) and time.monotonic() - start < timeout:
            for i, (proc, log) in enumerate(procs):
                if i not in ended and proc.poll() is not None:
                    ended[i] = time.monotonic() - start
                if failed_at is None and "CSSR_FAIL test hook" in log.read_text():
                    failed_at = time.monotonic() - start
            time.sleep(0.1)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                kill_tree(proc)
    assert len(ended) == len(procs), f"a machine was still running after {timeout} s"
    return [(proc.returncode, log.read_text(), ended[i]) for i, (proc, log) in enumerate(procs)], failed_at


@pytest.mark.slow
def test_two_machines_train_and_evaluate(tmp_path):
    results, _ = launch_machines(tmp_path, "two_nodes")
    for rank, (rc, log, _) in enumerate(results):
        assert rc == 0, f"machine {rank}:\n{log[-3000:]}"
    run = tmp_path / "runs" / "two_nodes"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == MACHINES * PER_MACHINE
    assert summary["num_test_known"] == 120 and summary["num_test_unknown"] == 80  # each sample once
    assert 0.0 <= summary["auroc"] <= 1.0 and 0.0 <= summary["closed_acc"] <= 1.0
    assert json.loads((run / "environment.json").read_text())["world_size"] == 4
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1]  # one writer (global rank 0), not one per machine
    assert (run / "checkpoints" / "best" / "weights.safetensors").is_file()


@pytest.mark.slow
def test_a_rank_dying_on_one_machine_stops_both_machines_within_60_s(tmp_path):
    """Global rank 3 (machine 1, local rank 1) exits abruptly at step 3 (CSSR_FAIL_* test hook)."""
    results, failed_at = launch_machines(tmp_path, "dies", {"CSSR_FAIL_RANK": "3", "CSSR_FAIL_STEP": "3",
                                                            "CSSR_FAIL_MODE": "exit"})
    (rc0, log0, t0), (rc1, log1, t1) = results
    assert rc0 != 0 and rc1 != 0, (log0[-2000:], log1[-2000:])
    assert "rank 3 fails at step 3" in log1
    assert "launch.py: rank 3 failed first (exit code 13)" in log1  # the machine that lost the rank says which
    assert "launch.py: rank" in log0 and "failed first" in log0    # the other one reports its own ranks' failure
    assert failed_at is not None
    print(f"machines down {t0 - failed_at:.1f} s / {t1 - failed_at:.1f} s after the failure")
    assert max(t0, t1) - failed_at < 60  # no 300 s barrier, no 30 min timeout
    assert not leftover_processes(str(tmp_path))


def _launch_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cssr_launch", ROOT / "launchers" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launcher_takes_multi_node_options_from_the_environment(monkeypatch):
    launch = _launch_module()
    for name in ("MACHINE_RANK", "SLURM_NODEID", "MASTER_ADDR", "MASTER_PORT", "NNODES", "SLURM_NNODES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NODEID", "3")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setenv("SLURM_NNODES", "4")
    argv = ["--multi_gpu", "--num_machines", "4", "--num_processes", "32", "train.py", "--config", "x.yaml"]
    assert launch.with_env_options(argv) == [
        "--multi_gpu", "--num_machines", "4", "--num_processes", "32", "--machine_rank", "3",
        "--main_process_ip", "10.0.0.1", "--main_process_port", "29555", "train.py", "--config", "x.yaml"]
    monkeypatch.setenv("MACHINE_RANK", "2")  # MACHINE_RANK wins over SLURM_NODEID; explicit options win over both
    out = launch.with_env_options(["--config_file", str(ROOT / "launchers" / "multi_node.yaml"),
                                   "--main_process_port", "1234", "train.py", "--main_process_port=9"])
    assert out[out.index("--machine_rank") + 1] == "2" and out[out.index("--num_machines") + 1] == "4"
    assert out.count("--main_process_port") == 1 and out[-1] == "--main_process_port=9"  # train.py's args untouched
    single = ["--num_processes", "1", "--num_machines", "1", "train.py"]
    assert launch.with_env_options(single) == single  # one machine: nothing added
    # no MASTER_PORT: every node of a Slurm job derives the same port from the job id, another job another one
    monkeypatch.delenv("MASTER_PORT")
    ports = []
    for job in ("4242", "4243"):
        monkeypatch.setenv("SLURM_JOB_ID", job)
        out = launch.with_env_options(["--config_file", str(ROOT / "launchers" / "multi_node.yaml"), "train.py"])
        ports.append(out[out.index("--main_process_port") + 1])
    assert ports == ["24242", "24243"]


def test_launcher_config_files_load_with_their_documented_shape():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {  # file: (distributed type, processes, machines, mixed precision, cpu)
        "cpu_1proc": ("NO", 1, 1, "no", True), "cpu_2proc": ("MULTI_GPU", 2, 1, "no", True),
        "gpu_1": ("NO", 1, 1, "bf16", False), "gpu_8": ("MULTI_GPU", 8, 1, "bf16", False),
        "multi_node": ("MULTI_GPU", 16, 2, "bf16", False),
    }
    for name, shape in expected.items():
        cfg = load_config_from_file(str(ROOT / "launchers" / f"{name}.yaml"))
        assert (str(cfg.distributed_type).split(".")[-1], cfg.num_processes, cfg.num_machines,
                cfg.mixed_precision, cfg.use_cpu) == shape, name
        if cfg.num_processes > 1 and cfg.num_machines == 1:  # 0: Accelerate's "a free port" (two jobs on one node)
            assert cfg.main_process_port == 0, name


def test_port_0_in_a_launcher_file_becomes_a_free_port():
    """What Accelerate does with the single-machine files' `main_process_port: 0`: a port free right now."""
    import argparse
    import socket

    from accelerate.utils.launch import prepare_multi_gpu_env

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        ports = set()
        for _ in range(2):
            args = argparse.Namespace(main_process_port=0)
            try:
                prepare_multi_gpu_env(args)
            except (AttributeError, TypeError):  # later fields of a full launch namespace; the port comes first
                pass
            ports.add(args.main_process_port)
        assert all(isinstance(p, int) and p > 0 and p != taken.getsockname()[1] for p in ports), ports
    finally:
        taken.close()


def test_launcher_scratch_folder_keeps_unix_socket_paths_short(monkeypatch, tmp_path):
    """DataLoader workers bind Unix sockets under TMPDIR; a long TMPDIR would break (and hang) them."""
    launch = _launch_module()
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert launch._scratch_base() == (str(tmp_path) if len(str(tmp_path)) <= launch.MAX_TMP_BASE else "/tmp")
    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    monkeypatch.setenv("TMPDIR", str(deep))
    assert launch._scratch_base() == "/tmp"
    # the longest socket path multiprocessing makes under the private folder fits in sun_path (108 bytes)
    longest = f"{'x' * launch.MAX_TMP_BASE}/cssr-launch-XXXXXXXX/pymp-XXXXXXXX/listener-XXXXXXXX"
    assert len(longest.encode()) < 108
