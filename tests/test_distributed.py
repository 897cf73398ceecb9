"""Distributed correctness on CPU (gloo): 2 processes must give what 1 process gives.

* evaluation gathers per-sample outputs with their ids and de-duplicates them: the
  metrics of one checkpoint on 1 and on 2 processes agree to 1e-6;
* score statistics reduced across ranks equal the single-process ones;
* 2 processes x batch b follow 1 process x batch 2b step by step;
* a dying rank brings every rank down quickly, and the log names it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cssr_dist.data.readers.native import eval_loader
from cssr_dist.distributed import gather_by_id
from tests.helpers import (ROOT, VENV_BIN, LaunchTimedOut, free_port, kill_tree, launch_train, leftover_processes,
                           run_session)
from tests.helpers import test_env as run_env

METRICS = ("closed_acc", "auroc", "aupr_in", "aupr_out", "fpr95_known_pos", "fpr95_ood_pos", "oscr", "macro_f1", "threshold")
TINY = ["--config", "configs/smoke.yaml", "data.train_per_class=100", "data.test_per_class=20",
        "data.stats_per_class=20", "data.batch_size=16", "schedule.epochs=1", "eval.test_interval=0",
        "run.progress=false", "tracking.log_every=10"]


# ---------------------------------------------------------------- unit level (no processes)
def test_strided_shards_cover_every_sample_once():
    for n, world in ((101, 2), (10, 3), (2, 4)):
        parts = [[int(x) for b in eval_loader(list(range(n)), 3, 0, r, world) for x in b] for r in range(world)]
        assert sorted(sum(parts, [])) == list(range(n))


def test_gather_by_id_removes_duplicates_and_sorts():
    # e.g. a padded last batch repeating samples 0 and 1 of the set
    local = {"ids": np.array([4, 0, 2, 0, 1, 1]), "s0": np.array([0.4, 0.0, 0.2, 0.0, 0.1, 0.1]),
             "labels": np.array([1, 0, -1, 0, 1, 1])}
    out = gather_by_id(local, world_size=1)
    assert out["ids"].tolist() == [0, 1, 2, 4]
    assert out["s0"].tolist() == [0.0, 0.1, 0.2, 0.4] and out["labels"].tolist() == [0, 1, -1, 1]


# ---------------------------------------------------------------- one trained checkpoint
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    out = launch_train(tmp, [*TINY, f"run.output_dir={tmp / 'runs'}", "run.name=base"], processes=1)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp


def _test_summary(tmp: Path, processes: int) -> dict:
    # every post-hoc detector too: their bounded training sample is the same for any process count
    out = launch_train(tmp, [*TINY, f"run.output_dir={tmp / 'runs'}", "run.name=base", "--test", "eval.baselines=all"],
                       processes=processes, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((tmp / "runs" / "base" / "summary_test.json").read_text())


@pytest.mark.slow
def test_checkpoint_metrics_identical_on_one_and_two_processes(trained):
    one, two = _test_summary(trained, 1), _test_summary(trained, 2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["num_test_known"] == two["num_test_known"] == 120
    assert one["num_test_unknown"] == two["num_test_unknown"] == 80
    for key in METRICS:
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    assert {"knn", "react", "vra", "mahalanobis"} <= set(one["baselines"]) and "posthoc_not_fitted" not in one
    for name, base in one["baselines"].items():
        for key in METRICS:
            assert two["baselines"][name][key] == pytest.approx(base[key], abs=1e-6), (name, key)
    assert two["per_unknown_class_auroc"] == pytest.approx(one["per_unknown_class_auroc"], abs=1e-6)


def _fit_statistics(tmp: Path, processes: int) -> dict[str, torch.Tensor]:
    out_file = tmp / f"stats_{processes}.safetensors"
    env = run_env(tmp)
    cmd = [str(VENV_BIN / "accelerate"), "launch"]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd += ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(free_port())]
    else:
        cmd += ["--cpu", "--num_processes", "1"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            str(ROOT / "tests" / "dist_worker.py"), str(out_file), str(tmp / "runs" / "base" / "checkpoints" / "best"),
            *TINY]
    out = run_session(cmd, env, 180)
    assert out.returncode == 0, out.stderr[-3000:]
    return load_file(str(out_file))


@pytest.mark.slow
def test_score_statistics_reduced_across_ranks_equal_one_process(trained):
    one, two = _fit_statistics(trained, 1), _fit_statistics(trained, 2)
    assert (int(one.pop("world_size")), int(two.pop("world_size"))) == (1, 2)
    assert set(one) == {"proto_sum", "proto_count", "gram_sum", "gram_count", "moments"}
    assert one["proto_count"].sum() == 101 and (one["proto_count"] > 0).sum() >= 3  # several classes
    assert one["moments"][:, 0].tolist() == [101.0, 101.0, 101.0]  # s0, s1, s2 counted once each
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-9, atol=1e-9, msg=key)


def _weights_after_steps(tmp: Path, name: str, processes: int, batch: int, extra: list[str]) -> tuple[dict, dict]:
    args = [*TINY, f"run.output_dir={tmp / 'runs'}", f"run.name={name}", f"data.batch_size={batch}",
            "run.max_steps=4", "eval.select_best_by=last", "data.num_workers=0", *extra]
    out = launch_train(tmp, args, processes=processes, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp / "runs" / name
    weights = {k: v for k, v in load_file(str(run / "checkpoints" / "best" / "weights.safetensors")).items()
               if k.startswith("model.")}
    return weights, json.loads((run / "history.jsonl").read_text().splitlines()[0])


@pytest.mark.slow
def test_two_ranks_of_batch_b_follow_one_rank_of_batch_2b(tmp_path):
    """The same 4 SGD steps (momentum, lr scaled by the global batch, warm-up) on the same images.

    Equivalence needs rank-invariant forward passes: torch's SyncBatchNorm is GPU-only, so on
    CPU the backbone is frozen (its BatchNorm in eval mode, as in fine-tuning) and the head,
    which has no BatchNorm, trains. Augmentation stays ON (flip + crop): every sample draws
    its own seed, so ranks see the very images one process sees.
    Tolerance: float32 sums in another order (one mean over 32 vs the mean of two means
    over 16, all-reduced): observed differences ~1e-7, allowed 1e-5 relative.
    """
    frozen = ["model.freeze_backbone=true"]
    w1, h1 = _weights_after_steps(tmp_path, "one_by_32", 1, 32, frozen)
    w2, h2 = _weights_after_steps(tmp_path, "two_by_16", 2, 16, frozen)
    assert h1["step"] == h2["step"] == 4
    assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)
    assert h2["lr"] == pytest.approx(h1["lr"], rel=1e-12)
    head = [k for k in w1 if k.startswith("model.head.")]
    assert head and set(w1) == set(w2)
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-5, atol=1e-6, msg=key)
    # the head did train: 4 steps moved its weights away from the seed's initialisation
    w0, _ = _weights_after_steps(tmp_path, "seed_only", 1, 32, [*frozen, "optim.lr=0.0"])
    assert max((w1[k] - w0[k]).abs().max().item() for k in head) > 1e-4  # 100x the tolerance above


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm needs 2 CUDA devices (torch has no CPU SyncBatchNorm)")
def test_two_gpus_with_sync_bn_follow_one_gpu_of_batch_2b(tmp_path):  # pragma: no cover - GPU machines only
    sync = ["model.sync_bn=true"]
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    w1, h1 = _gpu_run(tmp_path, "one", 1, 32, sync, env)
    w2, h2 = _gpu_run(tmp_path, "two", 2, 16, sync, env)
    assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-4)
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5, msg=key)


def _gpu_run(tmp: Path, name: str, processes: int, batch: int, extra: list[str], env: dict) -> tuple[dict, dict]:
    args = [*TINY, f"run.output_dir={tmp / 'runs'}", f"run.name={name}", f"data.batch_size={batch}",
            "run.max_steps=4", "eval.select_best_by=last", *extra]
    cmd = [str(VENV_BIN / "accelerate"), "launch", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    if processes > 1:
        cmd.insert(2, "--multi_gpu")
    full_env = {**run_env(tmp), **env}
    out = run_session([*cmd, str(ROOT / "train.py"), *args], full_env, 600)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp / "runs" / name
    weights = load_file(str(run / "checkpoints" / "best" / "weights.safetensors"))
    return ({k: v for k, v in weights.items() if k.startswith("model.")},
            json.loads((run / "history.jsonl").read_text().splitlines()[0]))


# ---------------------------------------------------------------- failure without hangs
def _launch_with_fault(tmp_path, mode: str, name: str, deadline_s: float, **extra_env: str) -> tuple[int, float | None, str]:
    """2 CPU ranks with the CSSR_FAIL_* hook on rank 1 at step 3; returns (exit code, when the hook
    fired (monotonic), log). The launch is killed at `deadline_s` whatever happens."""
    env = {**run_env(tmp_path), "ACCELERATE_USE_CPU": "1", "CSSR_FAIL_RANK": "1", "CSSR_FAIL_STEP": "3",
           "CSSR_FAIL_MODE": mode, **extra_env}
    cmd = [sys.executable, str(ROOT / "launchers" / "launch.py"), "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "train.py"), *TINY, f"run.output_dir={tmp_path / 'runs'}",
           f"run.name={name}"]
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline, fault_at = time.monotonic() + deadline_s, None
            while proc.poll() is None and time.monotonic() < deadline:
                if fault_at is None and "CSSR_FAIL test hook" in log_path.read_text():
                    fault_at = time.monotonic()
                time.sleep(0.1)
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                kill_tree(proc)
    return rc, fault_at, log_path.read_text()


@pytest.mark.slow
def test_a_dying_rank_brings_every_rank_down_within_60_s(tmp_path):
    """CSSR_FAIL_* test hook: rank 1 is SIGKILLed before step 3; rank 0 waits in a collective."""
    rc, failed_at, text = _launch_with_fault(tmp_path, "kill", "dies", 180)
    assert failed_at is not None, text[-3000:]
    assert rc == 1, text[-3000:]
    print(f"all ranks down {time.monotonic() - failed_at:.1f} s after the failure")
    assert time.monotonic() - failed_at < 60
    assert "rank 1 fails at step 3" in text
    assert "launch.py: rank 1 failed first (exit code -9)" in text
    assert not leftover_processes(str(tmp_path))


@pytest.mark.slow
def test_a_hung_rank_is_cut_off_by_the_process_group_timeout(tmp_path):
    """Rank 1 sleeps for ever (and ignores SIGTERM) at step 3. Rank 0's collective gives up after
    CSSR_DIST_TIMEOUT_S=10 s; torchrun then SIGTERMs rank 1 and SIGKILLs it 30 s later."""
    rc, hung_at, text = _launch_with_fault(tmp_path, "hang", "hangs", 240, CSSR_DIST_TIMEOUT_S="10")
    assert hung_at is not None and rc == 1, text[-3000:]
    print(f"all ranks down {time.monotonic() - hung_at:.1f} s after the hang")
    assert time.monotonic() - hung_at < 60
    # gloo's collective timeout on rank 0: "Timed out waiting 10000ms ..." or "Application timeout caused pair closure"
    assert "Timed out waiting 10000ms" in text or "Application timeout" in text, text[-4000:]
    assert "rank      : 1 (local_rank: 1)" in text and "(SIGKILL)" in text, text[-4000:]
    assert not leftover_processes(str(tmp_path))


@pytest.mark.slow
def test_a_launch_past_the_tests_deadline_prints_each_ranks_stack_and_leaves_no_process(tmp_path):
    """The tests' deadline (helpers.run_session -> kill_tree) on a launch that would wait 30 min:
    rank 1 hangs at step 3, rank 0 waits in its collective (torch's default timeout). At the
    deadline both ranks print their stacks (train.py's STACK_SIGNAL) and then nothing of the launch
    is left, although torchrun runs each rank in a session of its own (a kill of the launcher's
    process group alone left both ranks running and the test waiting on their pipes for ever)."""
    marker = str(tmp_path / "runs")
    start = time.monotonic()
    with pytest.raises(LaunchTimedOut) as timed_out:
        launch_train(tmp_path, [*TINY, f"run.output_dir={marker}", "run.name=deadline"], processes=2, timeout=60,
                     extra_env={"CSSR_FAIL_RANK": "1", "CSSR_FAIL_STEP": "3", "CSSR_FAIL_MODE": "hang"})
    assert time.monotonic() - start < 60 + 30
    out, err = timed_out.value.output or "", timed_out.value.stderr or ""
    assert "rank 1 fails at step 3 (mode hang)" in out, out[-3000:] + err[-3000:]
    assert "in _fail_now" in err, err[-6000:]  # rank 1's stack
    assert err.count("in train_epoch") >= 2, err[-6000:]  # and rank 0's, waiting in its step
    assert "in _fail_now" in str(timed_out.value)  # in the message: what pytest's report shows
    assert not leftover_processes(str(tmp_path))


def test_process_group_timeout_from_the_environment(monkeypatch):
    from cssr_dist.engine.distributed import process_group_kwargs
    from cssr_dist.errors import ConfigError

    monkeypatch.delenv("CSSR_DIST_TIMEOUT_S", raising=False)
    assert process_group_kwargs() == []
    monkeypatch.setenv("CSSR_DIST_TIMEOUT_S", "90")
    (handler,) = process_group_kwargs()
    assert handler.timeout.total_seconds() == 90
    monkeypatch.setenv("CSSR_DIST_TIMEOUT_S", "ten")
    with pytest.raises(ConfigError, match="CSSR_DIST_TIMEOUT_S='ten' is not a positive number of seconds"):
        process_group_kwargs()


def test_seeded_samples_make_augmentation_a_function_of_the_sample():
    """The same (seed, epoch, index) gives the same random draws whatever was drawn before."""
    from cssr_dist.data.readers.native import SeededSamples

    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return torch.rand(3)

    data = SeededSamples(Noise(), seed=0)
    first = data[5]
    torch.rand(100)                       # other consumers of the global RNG in between
    assert torch.equal(data[5], first)
    assert not torch.equal(data[4], first)
    data.set_epoch(1)
    assert not torch.equal(data[5], first)  # a new epoch, new augmentations
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    data[2]
    assert torch.equal(torch.rand(1), expected)  # the global RNG stream is left untouched


def test_imagenet_config_carries_the_fine_tuning_recipe():
    """configs/imagenet/rcssr.yaml, what slurm/imagenet_rcssr.sh runs by default (docs/method.md §5)."""
    from cssr_dist.cli import config_from_args, parse
    from cssr_dist.models.backbones import resolve_backbone_data_config

    cfg = config_from_args(parse(["--config", "configs/imagenet/rcssr.yaml"]))
    assert cfg.data.image_size is None  # "the backbone's own": the engine resolves it, as below
    cfg.data = resolve_backbone_data_config(cfg.model, cfg.data)
    assert (cfg.data.format, cfg.data.shards.train, cfg.data.shards.test) == ("shards", "imagenet-train", "imagenet-val")
    assert (cfg.data.image_size, cfg.data.test_resize, cfg.data.train_augment) == (224, 256, "imagenet")
    assert cfg.data.mean == [0.485, 0.456, 0.406] and cfg.data.std == [0.229, 0.224, 0.225]
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.model.head, cfg.model.latent_dim) == ("resnet18.tv_in1k", True, "rcssr", 16)
    assert cfg.run.method == "cssr_ft" and cfg.model.freeze_backbone
    assert (cfg.optim.lr, cfg.optim.scale_lr_by_batch, cfg.optim.weight_decay) == (0.4, True, 1e-4)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.milestones) == (4, 1.0, [3.0])
    assert cfg.eval.score == "s0"
