"""The Slurm scripts on a real (throwaway, local) Slurm cluster with two emulated nodes.

tools/slurm_cluster.sh starts slurmctld + two slurmd ("node1", "node2", both this
machine); the tests submit slurm/imagenet_rcssr.sh (its default ImageNet config, on tiny
ImageNet-format shards) and slurm/osr_sweep.sh with sbatch exactly as a user would, made
tiny through overrides and run on CPU (ACCELERATE_USE_CPU=1, no GPUs requested, rendezvous
on 127.0.0.1 because the node names do not resolve). The tiny run is stopped after its first
checkpoint by USR1, by Slurm's own preemption (a `high` job; partitions `low` with a grace time,
`low0` without) and by SIGTERM to the batch shell; each must end in exit 42, a requeue and a resume.
An ImageNet sweep (tools/sweep.py --slurm) is submitted with the cluster options, which
`scontrol show job` must show, and its wrong data.root must end the job in the pre-flight, before srun.
Skipped only when Slurm is not installed (tools/setup.sh --dev installs it; CI runs them).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

import pytest

from cssr_dist.apps.make_shards.cli import main as make_shards
from tests.conftest import write_images
from tests.helpers import ROOT
from tests.helpers import test_env as run_env

if not (shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()):
    pytest.skip("slurmctld is not installed (tools/setup.sh --dev installs slurmctld slurmd slurm-client munge)",
                allow_module_level=True)

TINY = ["data.train_per_class=100", "data.test_per_class=20", "data.stats_per_class=20", "data.batch_size=16",
        "schedule.epochs=1", "eval.test_interval=0", "run.progress=false"]
NO_GPUS = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]


def _free_port_triple() -> int:
    """A base port p with p, p+1, p+2 free (slurmctld and the two slurmd)."""
    for base in range(16817, 26817, 3):
        try:
            socks = []
            for port in (base, base + 1, base + 2):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port triple for the test cluster")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(tmp dir, environment for sbatch/scontrol and the jobs)."""
    tmp = tmp_path_factory.mktemp("slurm")
    cluster_dir = tmp / "cluster"
    env = {**run_env(tmp), "SLURM_CLUSTER_PORT": str(_free_port_triple())}
    tool = ["bash", str(ROOT / "tools" / "slurm_cluster.sh")]
    start = subprocess.run([*tool, "start", str(cluster_dir)], env=env, capture_output=True, text=True, timeout=60)
    assert start.returncode == 0, start.stdout + start.stderr
    env.update(SLURM_CONF=str(cluster_dir / "etc" / "slurm.conf"), ACCELERATE_USE_CPU="1", MASTER_ADDR="127.0.0.1",
               CSSR_ROOT=str(ROOT), CSSR_PYTHON=sys.executable)
    yield tmp, env
    subprocess.run([*tool, "stop", str(cluster_dir)], env=env, capture_output=True, timeout=60)


def _job_info(env: dict, job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _sbatch(env: dict, args: list[str], cwd: Path = ROOT) -> subprocess.Popen:
    """`sbatch --wait --parsable ...`: prints the job id, returns when the job (all tasks) ended."""
    return subprocess.Popen(["sbatch", "--wait", "--parsable", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _job_id(proc: subprocess.Popen) -> str:
    return proc.stdout.readline().strip().split(";")[0]


# ---------------------------------------------------------------- imagenet_rcssr.sh: 2 nodes, preempted
def _tiny_imagenet_shards(root: Path) -> Path:
    """ImageNet-format shards (imagefolder of wnid folders): 4 classes x 64 train / 8 val images."""
    for subset, per_class in (("train", 64), ("val", 8)):
        for c in range(4):
            write_images(root / subset / f"n{c:08d}", [f"{c}_{i}.png" for i in range(per_class)], size=40,
                         seed=1000 * c + (0 if subset == "train" else 500))
    shards = root / "shards"
    common = ["--dataset", "imagenet", "--workers", "1", "--no-progress"]
    assert make_shards(["--source", "imagefolder", "--root", str(root / "train"), "--subset", "train",
                        "--out", str(shards / "imagenet-train"), "--samples-per-shard", "16", *common]) in (0, None)
    assert make_shards(["--source", "imagefolder", "--root", str(root / "val"), "--subset", "val",
                        "--classes-from", str(shards / "imagenet-train.json"), "--out", str(shards / "imagenet-val"),
                        "--samples-per-shard", "8", *common]) in (0, None)
    return shards


@pytest.fixture(scope="module")
def shards(cluster) -> Path:
    return _tiny_imagenet_shards(cluster[0] / "imagenet")


def _tiny_rcssr(shards: Path, runs: Path, name: str) -> list[str]:
    """The DEFAULT config (configs/imagenet/rcssr.yaml: shards, frozen ResNet-18, RCSSR, S0) made tiny
    by overrides: 2 epochs of 12 steps on 2 processes, a checkpoint every 2 steps. W&B stays on
    (offline): Slurm signals its service process too (tracking.FailSoftWandBTracker)."""
    return [f"data.root={shards}", "data.known=[0,1,2]", "model.pretrained=false", "data.image_size=32",
            "data.test_resize=36", "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=0",
            'run.mixed_precision="no"', "model.channels_last=false", "schedule.epochs=2",
            "schedule.warmup_epochs=0.5", "schedule.milestones=[1]", "run.progress=false", "data.ood=[]",
            f"run.output_dir={runs}", f"run.name={name}", "run.checkpoint_every_steps=2", "tracking.log_every=1"]


def _run_and_stop(cluster, shards: Path, name: str, stop: Callable[[str], None], sbatch: list[str] = ()) -> dict:
    """Submit the tiny run on 2 nodes x 1 CPU process, call `stop(job id)` once its first
    checkpoint exists, wait for the job's end (requeues included)."""
    tmp, env = cluster
    runs = tmp / "runs"
    ckpts = runs / name / "checkpoints"
    t0 = time.monotonic()
    proc = _sbatch(env, ["--nodes=2", *NO_GPUS, *sbatch, f"--output={tmp}/slurm-%j.out", "slurm/imagenet_rcssr.sh",
                         *_tiny_rcssr(shards, runs, name)])
    try:
        job = _job_id(proc)
        deadline = time.monotonic() + 240
        while not list(ckpts.glob("step_*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        stop(job)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"{name}: job {job} ended after {time.monotonic() - t0:.1f} s")
    return dict(rc=rc, job=job, run=runs / name, info=_job_info(env, job), tmpdir=Path(env["TMPDIR"]),
                out=(tmp / f"slurm-{job}.out").read_text(), stderr=proc.stderr.read())


def _scancel(env: dict, *args: str) -> None:
    done = subprocess.run(["scancel", *args], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def _assert_requeued_once_and_resumed(result: dict) -> None:
    """Attempt 0 stopped with a checkpoint at step N, attempt 1 resumed from step N, one complete run."""
    assert result["rc"] == 0, result["out"][-4000:] + result["stderr"]
    info, job, run = result["info"], result["job"], result["run"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1"
    assert f"cssr job {job} restart 1:" in result["out"]
    logs = run / "slurm"
    assert sorted(p.name for p in logs.iterdir()) == [f"{job}.0", f"{job}.1"]
    first, second = (logs / f"{job}.0" / "node0.log").read_text(), (logs / f"{job}.1" / "node0.log").read_text()
    stopped = re.search(r"preempted at step (\d+) \(((?:in|end of) epoch \d+/2[^)]*)\); checkpoint written", first)
    assert stopped, first[-3000:]
    step = int(stopped.group(1))
    assert 0 < step < 24  # stopped mid-run (2 epochs x 12 steps)
    assert f"resuming {run.name} from step_{step:09d}" in second
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2]  # no epoch twice


@pytest.fixture(scope="module")
def preempted(cluster, shards):
    """USR1 (as --signal=USR1@T sends it before the time limit) after the first checkpoint."""
    return _run_and_stop(cluster, shards, "pre", lambda job: _scancel(cluster[1], "--signal=USR1", job))


@pytest.mark.slow
def test_preempted_job_is_requeued_once_and_completes(preempted):
    assert preempted["rc"] == 0, preempted["out"] + preempted["stderr"]
    assert preempted["info"]["JobState"] == "COMPLETED" and preempted["info"]["ExitCode"] == "0:0"
    assert preempted["info"]["Restarts"] == "1"
    out = preempted["out"]
    assert "2 node(s) x 1 process(es), rendezvous 127.0.0.1:" in out
    assert f"cssr job {preempted['job']}: preempted, checkpoint written; requeueing (restart 1)" in out
    assert f"cssr job {preempted['job']} restart 1:" in out


@pytest.mark.slow
def test_requeued_job_resumed_from_the_preemption_checkpoint(preempted):
    logs = preempted["run"] / "slurm"
    job = preempted["job"]
    assert sorted(p.name for p in logs.iterdir()) == [f"{job}.0", f"{job}.1"]  # a log folder per (re)start
    for attempt in (0, 1):
        assert sorted(p.name for p in (logs / f"{job}.{attempt}").glob("node*.log")) == ["node0.log", "node1.log"]
    first, second = (logs / f"{job}.0" / "node0.log").read_text(), (logs / f"{job}.1" / "node0.log").read_text()
    stopped = re.search(r"preempted at step (\d+) \(((?:in|end of) epoch \d+/2[^)]*)\); checkpoint written", first)
    assert stopped, first[-3000:]
    assert "launch.py: workers stopped for requeue" in first
    # stopped mid-epoch 1 ("in epoch 1/2 at step k/12") or after its evaluation ("end of epoch 1/2"):
    # the resume line says where, in the same words and the same 1-based epochs as the epoch lines
    step, where = int(stopped[1]), stopped[2]
    assert f"resuming pre from step_{step:09d} (step {step}: {where})" in second, second[-3000:]


@pytest.mark.slow
def test_requeued_job_wrote_one_complete_run(preempted):
    run = preempted["run"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2 and summary["score"] == "s0"
    assert summary["num_test_known"] == 24 and summary["num_test_unknown"] == 8  # every val image once
    config = (run / "config.yaml").read_text()  # the ImageNet recipe, made tiny only where overridden
    for line in ("method: cssr_ft", "backbone: resnet18.tv_in1k", "latent_dim: 16", "freeze_backbone: true",
                 "format: shards", "train_augment: imagenet", "scale_lr_by_batch: true"):
        assert line in config, line
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[1]["lr"] == pytest.approx(0.4 * 16 / 128 * 0.1)  # lr x global batch / 128, x0.1 after epoch 1
    scratch = preempted["tmpdir"]  # the jobs' TMPDIR (inherited from sbatch's environment)
    assert not list(scratch.glob("torchelastic_*")) and not list(scratch.glob("cssr-launch-*"))  # no litter


# ---------------------------------------------------------------- Slurm's own preemption; SIGTERM via Slurm
def _time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S").timestamp()  # scontrol: 1 s resolution


@pytest.fixture(scope="module", params=["low", "low0"])
def slurm_preempted(request, cluster, shards):
    """The tiny run in a preemptible partition (tools/slurm_cluster.sh: `low` with a 30 s GraceTime,
    `low0` without); after its first checkpoint a job in partition `high` that needs both nodes
    whole makes Slurm preempt it (PreemptType=preempt/partition_prio, PreemptMode=REQUEUE)."""
    tmp, env = cluster
    high = {}

    def preempt(job: str) -> None:
        done = subprocess.run(["sbatch", "--parsable", "--partition=high", "--nodes=2", "--exclusive", "--time=5",
                               f"--output={tmp}/high-%j.out", "--wrap", "sleep 5"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        high["job"] = done.stdout.strip().split(";")[0]

    result = _run_and_stop(cluster, shards, f"preempt_{request.param}", preempt, [f"--partition={request.param}"])
    return {**result, "partition": request.param, "high": _job_info(env, high["job"])}


@pytest.mark.slow
def test_slurm_preemption_requeues_the_job_which_resumes_after_the_preemptor(slurm_preempted):
    _assert_requeued_once_and_resumed(slurm_preempted)
    out, job = slurm_preempted["out"], slurm_preempted["job"]
    assert f"cssr job {job}: preempted, checkpoint written; requeueing (restart 1)" in out  # srun returned 42
    if slurm_preempted["partition"] == "low0":
        # Slurm requeued the job itself and SIGTERMed every process (batch shell and srun included,
        # as at a time limit); job.sh's own `scontrol requeue` is then refused, which is no error
        assert f"JOB {job} ON node1 CANCELLED" in out and "DUE TO PREEMPTION" in out
        assert f"cssr job {job}: scontrol requeue refused" in out
    else:  # GraceTime: SIGTERM to the steps only; job.sh requeued within the grace time
        assert "DUE TO PREEMPTION" not in out and "refused" not in out
    high = slurm_preempted["high"]
    assert high["JobState"] == "COMPLETED" and high["Partition"] == "high"
    # the preemptor ran between the attempts: the requeued job started again only after it ended
    assert _time(slurm_preempted["info"]["StartTime"]) >= _time(high["EndTime"])


@pytest.fixture(scope="module")
def terminated(cluster, shards):
    """SIGTERM to the batch shell only (`scancel --batch --signal=TERM`, as `--signal=B:TERM@T` sends it)."""
    return _run_and_stop(cluster, shards, "term", lambda job: _scancel(cluster[1], "--batch", "--signal=TERM", job))


@pytest.mark.slow
def test_sigterm_to_the_batch_shell_ends_in_a_checkpoint_exit_42_and_a_resume(terminated):
    """job.sh passes SIGTERM to srun as USR1: srun would turn a TERM into SIGKILL of every task
    ("srun: forcing job termination", exit 137, no checkpoint, no requeue: measured before the fix)."""
    _assert_requeued_once_and_resumed(terminated)
    assert f"cssr job {terminated['job']}: preempted, checkpoint written; requeueing (restart 1)" in terminated["out"]
    assert "forcing job termination" not in terminated["out"]


# ---------------------------------------------------------------- osr_sweep.sh: a job array
def test_sweep_grid_is_datasets_x_splits_x_methods(cluster):
    _, env = cluster
    env = {**env, "SWEEP_DATASETS": "mnist fashion_mnist", "SWEEP_METHODS": "linear rcssr"}
    listing = subprocess.run(["bash", "slurm/osr_sweep.sh", "--list"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=30)
    lines = listing.stdout.splitlines()
    assert lines[:3] == ["0 mnist 0 linear", "1 mnist 0 rcssr", "2 mnist 1 linear"]
    assert lines[10:12] == ["10 fashion_mnist 0 linear", "11 fashion_mnist 0 rcssr"]
    assert lines[20] == "submit with: sbatch --array=0-19%8 slurm/osr_sweep.sh [key=value ...]"


@pytest.mark.slow
def test_sweep_array_tasks_run_their_combination_in_their_own_folder(cluster):
    """Tasks 0 and 3 of the grid mnist x {0, 1} x {linear, rcssr}: different splits and methods."""
    tmp, env = cluster
    runs = tmp / "sweep"
    env = {**env, "SWEEP_DATASETS": "mnist", "SWEEP_SPLITS": "0 1", "SWEEP_METHODS": "linear rcssr",
           "SWEEP_TAG": "t"}
    proc = _sbatch(env, ["--array=0,3", *NO_GPUS, f"--output={tmp}/sweep-%A_%a.out", "slurm/osr_sweep.sh",
                         *TINY, "data.train_per_class=30", "data.batch_size=32", f"run.output_dir={runs}"])
    try:
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = "\n".join(p.read_text() for p in sorted(tmp.glob("sweep-*.out")))
    assert rc == 0, logs[-4000:] + proc.stderr.read()
    assert "sweep task 0/4: mnist split 0 linear" in logs and "sweep task 3/4: mnist split 1 rcssr" in logs
    expected = {"t_mnist_linear_0": ("0", "msp"), "t_mnist_rcssr_1": ("1", "integrated")}
    assert sorted(p.name for p in runs.iterdir()) == sorted(expected)
    for name, (split, score) in expected.items():
        summary = json.loads((runs / name / "summary.json").read_text())
        assert summary["run"] == name and summary["score"] == score and summary["world_size"] == 1
        config = (runs / name / "config.yaml").read_text()
        assert re.search(rf"^  split: ['\"]?{split}['\"]?$", config, re.M), config


# ---------------------------------------------------------------- failures end the job, without requeue
@pytest.mark.slow
def test_a_dying_rank_fails_the_job_within_60_s_without_requeue(cluster):
    tmp, env = cluster
    env = {**env, "CSSR_FAIL_RANK": "1", "CSSR_FAIL_STEP": "3", "CSSR_FAIL_MODE": "exit"}
    run = tmp / "runs" / "dies"
    proc = _sbatch(env, ["--nodes=2", *NO_GPUS, f"--output={tmp}/slurm-%j.out", "slurm/imagenet_rcssr.sh",
                         "configs/smoke.yaml", *TINY, f"run.output_dir={tmp / 'runs'}", "run.name=dies"])
    try:
        job, failed_at = _job_id(proc), None
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if failed_at is None and any("CSSR_FAIL test hook" in p.read_text() for p in run.glob("slurm/*/node*.log")):
                failed_at = time.time()
            time.sleep(0.2)
        rc = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc != 0 and failed_at is not None
    info = _job_info(env, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"
    ended = datetime.strptime(info["EndTime"], "%Y-%m-%dT%H:%M:%S").timestamp()  # 1 s resolution
    print(f"job ended {ended - failed_at:.0f} s after the failure")  # sbatch --wait polls: it returns later
    assert ended - failed_at < 60
    node1 = (run / "slurm" / f"{job}.0" / "node1.log").read_text()
    assert "launch.py: rank 1 failed first (exit code 13)" in node1
    assert f"failed with exit code 1; see {run}/slurm/{job}.0/node*.log" in (tmp / f"slurm-{job}.out").read_text()


@pytest.mark.slow
def test_a_bad_config_fails_fast_with_one_line(cluster):
    tmp, env = cluster
    proc = _sbatch(env, [*NO_GPUS, f"--output={tmp}/bad-%j.out", "slurm/imagenet_rcssr.sh", "configs/smoke.yaml",
                         "optim.lrr=0.1", f"run.output_dir={tmp / 'runs'}"])
    job = _job_id(proc)
    assert proc.wait(timeout=120) == 2
    out = (tmp / f"bad-{job}.out").read_text()
    assert "error: unknown config key 'optim.lrr'" in out and "did you mean 'optim.lr'" in out
    assert not (tmp / "runs" / f"configs_smoke_{job}").exists()


# ---------------------------------------------------------------- cssr-sweep --slurm: resources and pre-flight
@pytest.mark.slow
def test_sweep_submits_with_the_cluster_options_and_a_bad_data_root_fails_preflight_before_srun(cluster):
    """An ImageNet sweep goes to imagenet_rcssr.sh with the given partition/account/nodes/GPUs/CPUs/time
    (scontrol shows them); the job's pre-flight finds the wrong data.root on the batch host and ends
    it with one line, exit 2, before srun starts any node (no node log, no run folder)."""
    tmp, env = cluster
    runs, out = tmp / "sweep_pre", tmp / "sweep_pre-%j.out"
    submit = subprocess.run(
        [sys.executable, "tools/sweep.py", "--datasets", "imagenet", "--methods", "openood_rcssr",
         "--output-dir", str(runs), "--slurm", "--partition", "low0", "--account", "cssrtest", "--nodes", "2",
         "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "7",
         "--no-preflight", "--", f"data.root={tmp / 'nowhere'}", "model.pretrained=false"],
        cwd=ROOT, env={**env, "SBATCH_OUTPUT": str(out)}, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job = re.search(r"Submitted batch job (\d+)", submit.stdout).group(1)
    deadline, info = time.monotonic() + 120, {}
    while time.monotonic() < deadline:
        info = _job_info(env, job)
        if info.get("JobState") in ("FAILED", "COMPLETED", "CANCELLED", "TIMEOUT"):
            break
        time.sleep(0.5)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), info
    assert (info["Partition"], info["Account"], info["NumNodes"], info["TimeLimit"], info["JobName"]) == \
        ("low0", "cssrtest", "2", "00:07:00", "imagenet_openood_rcssr_default_s0")
    assert info["Restarts"] == "0"
    lines = Path(str(out).replace("%j", job)).read_text().splitlines()
    assert lines == [f"preflight: data.root: {tmp / 'nowhere'} is not a folder; the shard prefixes (imagenet-train, "
                     "openood-imagenet-test, openood-ssb_hard, ...) are looked up there"]
    assert not runs.exists()  # srun never ran: no run folder, no node logs
