"""Sweep expansion, skip / resume logic and the Slurm submission, with a fake launcher."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cssr_dist.errors import ConfigError
from cssr_dist.apps.sweep import (RunSpec, SlurmResources, expand, main, main_launcher_default, multinode_submissions,
                                  run_local, run_state, slurm_submission, submit_slurm, train_command)

ROOT = Path(__file__).resolve().parent.parent

# Stands in for `accelerate launch`: gets `train.py --config C overrides...`, logs its call,
# creates the run folder, and "crashes" (exit 3) on the first try of runs named in FAIL_ONCE.
FAKE = '''
import json, os, sys
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[4:] if "=" in a)
assert sys.argv[1:3] == ["train.py", "--config"], sys.argv
folder = Path(args["run.output_dir"]) / args["run.name"]
with open(Path(os.environ["CALLS"]), "a") as fh:
    fh.write(json.dumps({"config": sys.argv[3], "args": args, "resumed": folder.is_dir()}) + "\\n")
folder.mkdir(parents=True, exist_ok=True)
if args["run.name"] in os.environ.get("FAIL_ONCE", "").split() and not (folder / "checkpoint").exists():
    (folder / "checkpoint").write_text("epoch 1")
    sys.exit(3)
(folder / "summary.json").write_text(json.dumps({"auroc": 0.5}))
'''


def test_expand_order_names_and_errors():
    specs = expand(["fashion_mnist", "mnist"], ["linear", "rcssr"], seeds=[0, 1], configs_dir=ROOT / "configs")
    assert len(specs) == 5 * 2 * 2 + 5 * 2 * 2
    assert [s.name for s in specs[:4]] == ["fashion_mnist_linear_0_s0", "fashion_mnist_linear_0_s1",
                                           "fashion_mnist_rcssr_0_s0", "fashion_mnist_rcssr_0_s1"]
    assert specs[20] == RunSpec("mnist", "linear", "0", 0)
    assert RunSpec("cifar10", "pcssr", "b", 2, "t").name == "t_cifar10_pcssr_b_s2"
    assert train_command(specs[20], ["accelerate", "launch"], "out") == [
        "accelerate", "launch", "train.py", "--config", "configs/mnist/linear.yaml", "data.split=0", "run.seed=0",
        "run.name=mnist_linear_0_s0", "run.output_dir=out"]
    with pytest.raises(ConfigError, match="no config .*nosuch"):
        expand(["mnist"], ["nosuch"], configs_dir=ROOT / "configs")
    with pytest.raises(ConfigError, match="no default splits"):
        expand(["cifar100"], ["rcssr"], configs_dir=ROOT / "configs")


def test_run_local_skips_finished_and_resumes_interrupted(tmp_path, monkeypatch):
    fake = tmp_path / "fake_launch.py"
    fake.write_text(FAKE)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("CALLS", str(calls))
    monkeypatch.setenv("FAIL_ONCE", "mnist_rcssr_1_s0")
    out = tmp_path / "runs"
    specs = expand(["mnist"], ["linear", "rcssr"], splits=["0", "1"], configs_dir=ROOT / "configs")
    (out / "mnist_linear_0_s0").mkdir(parents=True)
    (out / "mnist_linear_0_s0" / "summary.json").write_text("{}")  # finished before the sweep
    assert [run_state(out, s) for s in specs] == ["finished", "new", "new", "new"]
    lines: list[str] = []
    ticks = iter(range(0, 1000, 10))
    outcome = run_local(specs, [sys.executable, str(fake)], out, ["schedule.epochs=1"], cwd=tmp_path,
                        clock=lambda: next(ticks), log=lines.append)
    assert outcome == {"mnist_linear_0_s0": "skipped", "mnist_rcssr_0_s0": "finished",
                       "mnist_linear_1_s0": "finished", "mnist_rcssr_1_s0": "failed (exit 3)"}
    assert lines[0] == "[1/4] mnist_linear_0_s0: finished, skipped"
    assert lines[1].startswith("[2/4] mnist_rcssr_0_s0: starting: ")
    # one progress line per launched run with elapsed time and an ETA over the runs still to launch
    assert lines[2] == "[2/4] mnist_rcssr_0_s0: finished in 0:00:10; elapsed 0:00:20, 2 to go, ETA 0:00:40"
    assert lines[-1].startswith("[4/4] mnist_rcssr_1_s0: failed (exit 3) in ")
    first = [json.loads(x) for x in calls.read_text().splitlines()]
    assert [c["args"]["run.name"] for c in first] == ["mnist_rcssr_0_s0", "mnist_linear_1_s0", "mnist_rcssr_1_s0"]
    assert first[0]["config"] == "configs/mnist/rcssr.yaml" and first[0]["args"]["schedule.epochs"] == "1"
    assert first[0]["args"]["data.split"] == "0" and first[0]["args"]["run.seed"] == "0"
    assert run_state(out, specs[3]) == "interrupted"

    # the same sweep again: only the interrupted run is relaunched, into its own folder
    calls.unlink()
    lines.clear()
    ticks = iter(range(0, 1000, 10))
    outcome = run_local(specs, [sys.executable, str(fake)], out, cwd=tmp_path, clock=lambda: next(ticks),
                        log=lines.append)
    assert outcome["mnist_rcssr_1_s0"] == "finished" and list(outcome.values()).count("skipped") == 3
    again = [json.loads(x) for x in calls.read_text().splitlines()]
    assert [(c["args"]["run.name"], c["resumed"]) for c in again] == [("mnist_rcssr_1_s0", True)]
    assert "resuming" in lines[3]
    assert all(run_state(out, s) == "finished" for s in specs)


def test_the_default_launcher_is_the_projects_launch_py():
    """launchers/launch.py: a run stopped by bad input ends in its one line, not the launcher's traceback."""
    python, script = main_launcher_default()
    assert python == sys.executable and Path(script) == ROOT / "launchers" / "launch.py" and Path(script).is_file()


def test_dry_run_launches_nothing(tmp_path):
    specs = expand(["fashion_mnist"], ["rcssr"], configs_dir=ROOT / "configs")
    called = []
    out = run_local(specs, ["launch"], tmp_path, dry_run=True, run=lambda *a, **k: called.append(a), log=lambda _: None)
    assert out == {f"fashion_mnist_rcssr_{split}_s0": "dry-run" for split in "01234"} and called == []


def test_slurm_submission_lists_only_unfinished_tasks_of_the_scripts_grid(tmp_path):
    specs = expand(["fashion_mnist", "mnist"], ["linear", "rcssr"], seeds=[0], tag="t", configs_dir=ROOT / "configs")
    for spec in specs[:3]:
        (tmp_path / spec.name).mkdir()
        (tmp_path / spec.name / "summary.json").write_text("{}")
    cmd, env = slurm_submission(specs, tmp_path, ["data.root=/d"], parallel=4)
    assert cmd == ["sbatch", "--array=" + ",".join(map(str, range(3, 20))) + "%4", "slurm/osr_sweep.sh",
                   f"run.output_dir={tmp_path}", "data.root=/d"]
    assert env == {"SWEEP_DATASETS": "fashion_mnist mnist", "SWEEP_METHODS": "linear rcssr", "SWEEP_SEEDS": "0",
                   "SWEEP_TAG": "t"}
    # the script's own listing of that grid names the same runs in the same order
    listing = subprocess.run(["bash", "slurm/osr_sweep.sh", "--list"], cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env},
                             capture_output=True, text=True, timeout=30).stdout.splitlines()
    assert [line.split()[1:] for line in listing[:-1]] == [[s.dataset, s.split, s.method, str(s.seed)] for s in specs]
    for spec in specs[3:]:
        (tmp_path / spec.name).mkdir()
        (tmp_path / spec.name / "summary.json").write_text("{}")
    assert slurm_submission(specs, tmp_path) is None
    with pytest.raises(ConfigError, match="full grid"):
        slurm_submission(specs[:-1] + [RunSpec("mnist", "rcssr", "9", 0, "t")], tmp_path)


# ---------------------------------------------------------------- cluster resources (no Slurm needed)
def test_sbatch_options_carry_partition_account_nodes_gpus_and_time():
    full = SlurmResources(partition="gpu", account="proj1", nodes=2, gpus_per_node=8, time="1-12:00:00",
                          cpus_per_task=64).check()
    assert full.sbatch_options() == ["--partition=gpu", "--account=proj1", "--nodes=2", "--gpus-per-node=8",
                                     "--cpus-per-task=64", "--time=1-12:00:00"]
    assert SlurmResources().sbatch_options() == []  # the script's own #SBATCH lines then
    assert SlurmResources(gpus_per_node=0, time="90").check().sbatch_options() == ["--gpus-per-node=0", "--time=90"]
    for bad, says in ((SlurmResources(time="12h"), "--time '12h' is not a Slurm time limit"),
                      (SlurmResources(nodes=0), "--nodes 0: a job needs at least 1 node"),
                      (SlurmResources(cpus_per_task=0), "--cpus-per-task 0"),
                      (SlurmResources(gpus_per_node=-1), "--gpus-per-node -1"),
                      (SlurmResources(partition="a b/c"), "--partition")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            bad.check()


def test_array_submission_carries_the_resources(tmp_path):
    specs = expand(["mnist"], ["rcssr"], splits=["0", "1"], configs_dir=ROOT / "configs")
    cmd, _ = slurm_submission(specs, tmp_path, ["data.root=/d"], parallel=2,
                              resources=SlurmResources(partition="p", account="a", nodes=1, gpus_per_node=1, time="60"))
    assert cmd == ["sbatch", "--partition=p", "--account=a", "--nodes=1", "--gpus-per-node=1", "--time=60",
                   "--array=0,1%2", "slurm/osr_sweep.sh", f"run.output_dir={tmp_path}", "data.root=/d"]


def test_imagenet_runs_get_one_multinode_job_each(tmp_path, capsys):
    specs = expand(["imagenet"], ["openood_rcssr", "openood_rcssr_r50"], configs_dir=ROOT / "configs")
    assert [s.name for s in specs] == ["imagenet_openood_rcssr_default_s0", "imagenet_openood_rcssr_r50_default_s0"]
    (tmp_path / specs[0].name).mkdir()
    (tmp_path / specs[0].name / "summary.json").write_text("{}")  # finished: not submitted again
    res = SlurmResources(partition="gpu", account="proj", nodes=4, gpus_per_node=8, time="12:00:00")
    assert multinode_submissions(specs, tmp_path, ["data.root=/s"], res) == [[
        "sbatch", "--partition=gpu", "--account=proj", "--nodes=4", "--gpus-per-node=8", "--time=12:00:00",
        "--job-name=imagenet_openood_rcssr_r50_default_s0", "slurm/imagenet_rcssr.sh",
        "configs/imagenet/openood_rcssr_r50.yaml", "data.split=default", "run.seed=0",
        "run.name=imagenet_openood_rcssr_r50_default_s0", f"run.output_dir={tmp_path}", "data.root=/s"]]
    # through the command line: the ImageNet config picks the multi-node script
    argv = ["--datasets", "imagenet", "--methods", "openood_rcssr", "--output-dir", str(tmp_path / "new"), "--slurm",
            "--partition", "gpu", "--nodes", "2", "--gpus-per-node", "8", "--time", "08:00:00", "--dry-run"]
    assert main([*argv, "--no-preflight", "--", "data.root=/s"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["sbatch --partition=gpu --nodes=2 --gpus-per-node=8 --time=08:00:00 "
                   "--job-name=imagenet_openood_rcssr_default_s0 slurm/imagenet_rcssr.sh "
                   "configs/imagenet/openood_rcssr.yaml data.split=default run.seed=0 "
                   f"run.name=imagenet_openood_rcssr_default_s0 run.output_dir={tmp_path / 'new'} data.root=/s"]
    # with the pre-flight: a data root without shards submits nothing, one line per problem
    assert main([*argv, "--", f"data.root={tmp_path / 'nowhere'}", "model.pretrained=false"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.splitlines() == [
        f"preflight: imagenet_openood_rcssr_default_s0: data.root: {tmp_path / 'nowhere'} is not a folder; the shard "
        "prefixes (imagenet-train, openood-imagenet-test, openood-ssb_hard, ...) are looked up there",
        "error: 1 pre-flight problem(s) in 1 run(s); nothing was submitted"]
    assert main([*argv[:6], "--slurm", "--time", "8 hours"]) == 2
    assert capsys.readouterr().err.strip() == "error: --time '8 hours' is not a Slurm time limit; use minutes, " \
        "HH:MM:SS or D-HH:MM:SS"


def test_a_refused_sbatch_stops_the_submission_with_one_line(tmp_path, capsys):
    """The first sbatch that fails (a partition the account may not use, a limit) ends the submission:
    the rest would fail alike, and the same sweep command submits them later."""
    specs = expand(["imagenet"], ["openood_rcssr", "openood_rcssr_r50"], configs_dir=ROOT / "configs")
    args = argparse.Namespace(output_dir=str(tmp_path), overrides=["data.root=/s"], no_preflight=True, dry_run=False,
                              parallel=8)
    calls = []

    def refused(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1)

    assert submit_slurm(specs, args, SlurmResources(partition="gpu"), run=refused) == 1
    assert len(calls) == 1 and calls[0][:3] == ["sbatch", "--partition=gpu", "--job-name=imagenet_openood_rcssr_default_s0"]
    assert capsys.readouterr().err.strip() == ("error: sbatch exited 1; 1 more job(s) not submitted; rerun the same "
                                               "command to submit the rest")
