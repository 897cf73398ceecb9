"""The benchmark scripts in benchmarks/ still run: each `--quick` as a subprocess (slow), and the
GPU benchmark on a machine without a GPU and without webdataset / wandb (as on the lent
GPU image): it must import and then stop with one clear line, not a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tests.helpers import test_env as offline_env

# (script, extra args, strings the output must contain)
QUICK = [
    ("bench_head.py", [], ["| K | C | batch | impl |", "| chunked |", "| loop |", "| l2 |"]),
    ("bench_metrics.py", [], ["compute_metrics", "OSCR"]),
    ("bench_data.py", [], ["decode+transform limit", "shards, buffer"]),
]
BLOCK_OPTIONAL = "import sys; sys.modules['webdataset'] = None; sys.modules['wandb'] = None\n"


def run(args: list[str], tmp_path, timeout: int, **env) -> subprocess.CompletedProcess:
    environ = offline_env(tmp_path)
    environ.update(env)
    return subprocess.run(args, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout)


def json_rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.parametrize("script,extra,expected", QUICK, ids=[q[0] for q in QUICK])
def test_quick_benchmark_runs(tmp_path, script, extra, expected):
    proc = run([sys.executable, "-m", f"benchmarks.{script.removesuffix('.py')}", "--quick", *extra], tmp_path,
               timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for text in expected:
        assert text in proc.stdout, f"{script}: {text!r} missing from\n{proc.stdout[-2000:]}"


@pytest.mark.slow
def test_quick_train_step_measures_every_variant(tmp_path):
    proc = run([sys.executable, "-m", "benchmarks.bench_train_step", "--quick"], tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| model | batch | px | variant | images/s |" in proc.stdout
    rows = [r for r in json_rows(proc.stdout) if r["kind"] == "train_step"]
    assert [r["variant"] for r in rows] == ["fp32", "bf16", "channels_last", "loop"]
    for r in rows:
        assert r["images_per_s"] > 0 and r["loss_finite"] and len(r["step_times_s"]) == r["steps"]
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["step_s"], rel=0.01)


# The CPU rehearsal of the whole GPU run: tests/test_gpu_script.py.


def test_gpu_benchmark_without_cuda_says_so(tmp_path):
    code = BLOCK_OPTIONAL + "import benchmarks.bench_gpu as b\nsys.exit(b.main([]))"
    proc = run([sys.executable, "-c", code], tmp_path, timeout=120, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bench_gpu:")]
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "run_gpu_benchmarks.sh" in lines[0]


def test_gpu_run_script_without_cuda_fails_cleanly(tmp_path):
    proc = run(["bash", str(ROOT / "tools" / "run_gpu_benchmarks.sh")], tmp_path, timeout=120,
               CUDA_VISIBLE_DEVICES="", OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "no CUDA device" in (tmp_path / "out" / "gpu_bench.log").read_text()
