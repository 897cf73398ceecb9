"""The prepared GPU run (tools/run_gpu_benchmarks.sh -> benchmarks/bench_gpu.py): its scaling
arithmetic on known figures (fast), and the whole script rehearsed on the CPU with
wandb made unimportable in every process, as on the lent GPU image (webdataset comes from the
carried .whl wheels there, from the venv here) (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tests.helpers import test_env as offline_env


def step(model: str, variant: str, rate: float, head: str = "rcssr") -> dict:
    return dict(kind="train_step", model=model, variant=variant, images_per_s=rate, head=head, peak_mem_gib=1.0)


def test_scaling_arithmetic_and_target_verdicts():
    from benchmarks.bench_gpu import scaling_markdown

    rows = [step("resnet50_linear", "bf16_compile", 4000.0, "linear"), step("resnet50_ft", "bf16", 1000.0),
            step("resnet50_ft", "bf16_compile_fused", 3000.0), step("wrn40_4", "bf16_compile_ro", 15000.0),
            dict(kind="decode", decode_on="device", workers=3, cores=4, images_per_s=6000.0),
            dict(kind="decode", decode_on="cpu", workers=3, cores=4, images_per_s=600.0)]
    text = scaling_markdown(rows, "H100")
    # best RCSSR row: 3000 img/s per GPU -> 24,000 per node, 1,281,167 / 24,000 s = 0.9 min,
    # 24,000 / (600 / 3 per core) = 120 cores; with GPU decode 1 / (1/3000 + 1/6000) = 2000 img/s
    assert "| resnet50 | rcssr | bf16_compile_fused | 3,000 | 1.0 | 24,000 | 120 | 0.9 | 2,000 | 1.3 |" in text
    assert "RCSSR 3,000 (bf16_compile_fused) / linear 4,000 (bf16_compile) = 0.75x (>= 0.6x: met)" in text
    assert "target 3: WRN-40-4 best 15,000 img/s (bf16_compile_ro) = 2.11x" in text and "(>= 2x: met)" in text
    assert "target 4: GPU decode 6,000 img/s per GPU with 4 CPU cores vs the ResNet-50 + RCSSR step 3,000 (met)" \
        in text


@pytest.mark.slow
@pytest.mark.timeout(1700)  # the rehearsal has its own limit (BENCH_TIMEOUT_S, 1600 s below); 73-212 s measured
def test_the_prepared_run_rehearses_every_section_on_cpu_without_optional_packages(tmp_path):
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    env = offline_env(tmp_path)
    env.update(PYTHONPATH=f"{block}:{ROOT}", OUT=str(tmp_path / "out"), PYTHON=sys.executable,
               BENCH_TIMEOUT_S="1500")
    proc = subprocess.run(["bash", str(ROOT / "tools" / "run_gpu_benchmarks.sh"), "--rehearse"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1600)
    rows = [json.loads(line) for line in (tmp_path / "out" / "gpu_bench.jsonl").read_text().splitlines()]
    errors = [r for r in rows if "error" in r]
    assert proc.returncode == 0 and not errors, (errors, proc.stderr[-2000:])
    kinds = {r["kind"] for r in rows}
    assert {"header", "head_table", "sync_control", "sync_check", "train_step", "decode_shards", "decode"} <= kinds
    models = {r["model"] for r in rows if r["kind"] == "train_step" and "images_per_s" in r}
    assert {"resnet50_linear", "resnet50_pcssr", "resnet50_ft", "vitb16_linear", "vitb16_rcssr", "wrn40_4"} <= models
    compiled = [r for r in rows if r["kind"] == "train_step" and r.get("compile_mode") == "reduce-overhead"]
    assert compiled and all(r["compiled"] for r in compiled)
    decode = {(r["decode_on"], r["workers"]): r for r in rows if r["kind"] == "decode"}
    assert decode[("device", 3)]["images_per_s"] > 0 and decode[("cpu", 3)]["images_per_s"] > 0
    assert "| resnet50 | rcssr |" in (tmp_path / "out" / "scaling.md").read_text()
    assert "## decoding" in (tmp_path / "out" / "gpu_bench.md").read_text()
