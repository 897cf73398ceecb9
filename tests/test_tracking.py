"""W&B mode selection and the run folder writers."""

import json

import pytest

from cssr_dist.config import Config
from cssr_dist.engine.run_folder import RunFolder
from cssr_dist.eval.evaluator import group_means
from cssr_dist.eval.report import metrics_table, near_far_table
from cssr_dist.tracking import flatten, near_far_payload, wandb_init_kwargs, wandb_mode


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))


def test_offline_without_key(no_wandb_env):
    assert wandb_mode() == "offline"


def test_online_with_key(no_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"


def test_online_with_netrc_entry(no_wandb_env, tmp_path):
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode() == "online"


def test_explicit_mode_wins(no_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_init_kwargs_resume_same_run(no_wandb_env, tmp_path):
    cfg = Config()
    kw = wandb_init_kwargs(cfg, tmp_path, "abc123")
    assert (kw["id"], kw["resume"], kw["mode"], kw["dir"]) == ("abc123", "allow", "offline", str(tmp_path))


def test_flatten_nested_metrics():
    assert flatten("test", {"auroc": 0.9, "baselines": {"msp": {"auroc": 0.8}}, "skip": [1]}) == {
        "test/auroc": 0.9, "test/baselines/msp/auroc": 0.8}


def test_run_folder_files(tmp_path):
    cfg = Config()
    cfg.run.output_dir = str(tmp_path)
    cfg.run.name = "r"
    folder = RunFolder(cfg)
    folder.create()
    folder.write_config(cfg)
    folder.append_history({"epoch": 1, "loss": float("nan")})
    folder.append_history({"epoch": 2, "loss": 0.5})
    folder.write_summary({"auroc": 0.75})
    lines = (tmp_path / "r" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"epoch": 1, "loss": None}, {"epoch": 2, "loss": 0.5}]
    assert folder.read_summary() == {"auroc": 0.75}
    assert "head: rcssr" in (tmp_path / "r" / "config.yaml").read_text()


def test_run_end_record_is_fail_soft_and_a_no_op_without_wandb(tmp_path, capsys):
    """The end-of-run W&B record (summary + best/ artifact) never ends a finished run: a failing
    artifact costs one line and W&B stays off; without a W&B tracker nothing happens."""
    import types

    from cssr_dist.tracking import FailSoftWandBTracker, record_run_end

    best = tmp_path / "best"
    best.mkdir()
    (best / "weights.safetensors").write_bytes(b"w")

    def refuse(artifact, aliases):
        raise ConnectionResetError("service gone")

    tracker = FailSoftWandBTracker("p")
    tracker.run = types.SimpleNamespace(id="abc123", summary={}, log_artifact=refuse)
    acc = types.SimpleNamespace(is_main_process=True, trackers=[tracker])
    summary = {"run": "r", "best_epoch": 2, "best_selection": "best epoch 2 (...)", "train_time_s": 3.5,
               "images_per_s": None, "headline_auroc": 0.8, "headline_auroc_of": "near-OOD mean (a)"}
    assert record_run_end(acc, summary, best)
    assert tracker.run.summary == {"best_epoch": 2, "best_selection": "best epoch 2 (...)", "train_time_s": 3.5,
                                   "final/headline_auroc": 0.8, "final/headline_auroc_of": "near-OOD mean (a)"}
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("W&B artifact failed")]
    assert len(lines) == 1 and "ConnectionResetError: service gone" in lines[0] and tracker.failure
    assert not record_run_end(acc, summary, best)  # W&B is off for the rest of the attempt
    assert not record_run_end(types.SimpleNamespace(is_main_process=True, trackers=[]), summary, best)


def _ood(auroc: float, fpr: float, msp: float) -> dict:
    return {"score": "s0", "auroc": auroc, "fpr95_ood_pos": fpr, "baselines": {"msp": {"auroc": msp, "fpr95_ood_pos": 1.0}}}


def test_near_far_table_has_every_set_then_group_means_for_every_score():
    summary = {**_ood(0.9, 0.1, 0.8), "ood": {"ssb": _ood(0.6, 0.5, 0.5), "ninco": _ood(0.7, 0.3, 0.4),
                                              "tex": _ood(0.95, 0.05, 0.2)},
               "ood_groups": {"far": {"auroc": 0.95, "sets": ["tex"]},
                              "near": {"auroc": 0.73, "sets": ["test unknowns", "ssb", "ninco"]}}}
    columns, rows = near_far_table(summary)
    assert columns[:3] == ["score", "test unknowns auroc", "test unknowns fpr95_ood_pos"]
    assert columns[3::2] == ["ssb auroc", "ninco auroc", "tex auroc", "near auroc", "far auroc"]
    table = {row[0]: dict(zip(columns, row)) for row in rows}
    assert list(table) == ["s0", "msp"]
    assert table["s0"]["near auroc"] == pytest.approx((0.9 + 0.6 + 0.7) / 3)
    assert table["s0"]["near fpr95_ood_pos"] == pytest.approx(0.3)
    assert table["msp"]["near auroc"] == pytest.approx((0.8 + 0.5 + 0.4) / 3)  # baselines' means, formed here
    assert table["msp"]["far auroc"] == pytest.approx(0.2) and table["msp"]["tex fpr95_ood_pos"] == 1.0
    payload = near_far_payload(summary, "final")
    assert payload["final/tables/near_far"].columns == columns and payload["final/tables/near_far"].data == rows
    # no OOD groups (a split run without OOD sets): no table, nothing logged
    assert near_far_table({"score": "s0", "auroc": 0.9}) == ([], []) and near_far_payload({"auroc": 0.9}, "f") == {}


def test_group_means_come_near_then_far_as_in_openood():
    per_set = {"tex": {"auroc": 0.9}, "ssb": {"auroc": 0.6}, "x": {"auroc": 0.5}, "ninco": {"auroc": 0.8}}
    groups = group_means(per_set, {"tex": "far", "ssb": "near", "x": "mid", "ninco": "near"})
    assert list(groups) == ["near", "far", "mid"]
    assert groups["near"] == {"auroc": pytest.approx(0.7), "sets": ["ssb", "ninco"]}
    md = metrics_table({"score": "s0", "auroc": 0.5, "ood_groups": groups}, "r")
    assert md.index("| near mean (2 sets) |") < md.index("| far mean (1 sets) |") < md.index("| mid mean")
