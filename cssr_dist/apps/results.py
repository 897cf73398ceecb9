"""Result tables from finished runs: one row per experiment (data set, method, backbone,
protocol and the config fingerprint without split and seed) and score; cells mean +- std over
the experiment's splits and seeds only.

Sources: run folders (`config.yaml` + `summary.json`, the source of truth, or the run's
latest re-evaluation `summary_test.json` when it is newer, marked as such) or the offline
W&B files inside them (`wandb/offline-run-*`, read by :mod:`cssr_dist.wandb_offline`).
Every run contributes the ONE number its summary holds, produced under its own protocol's
model selection (validation or last epoch): nothing here chooses an epoch, a checkpoint or
a seed by a test metric. The same config, split and seed found twice counts once (the
newest) and is listed; runs that were expected (a sweep grid) but are missing, or started
but unfinished, are listed under the table instead of silently shrinking a mean.

Layouts: `single` (one metric on one evaluation set: test, near, far or an OOD set) and
`openood` (OpenOOD v1.5's: AUROC and FPR95 of every OOD set, then the near and far means).
Unknown metric, score or set names stop with one line listing the valid ones.

Files are read as data only (YAML safe_load, JSON).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from ..engine.run_folder import experiment_fingerprint
from ..errors import ConfigError, DataError
from ..eval.evaluator import TEST_UNKNOWNS
from ..wandb_offline import find_offline_runs, read_offline_run
from .sweep import RunSpec

__all__ = ["RunResult", "read_run_folder", "read_wandb_run", "with_config_ood_order", "scan", "metric_value",
           "Table", "build_table", "render", "LAYOUTS"]

LAYOUTS = ("single", "openood")
#: The OpenOOD v1.5 layout's metrics: AUROC and FPR at 95% TPR with OOD as the positive class.
OPENOOD_METRICS = ("auroc", "fpr95_ood_pos")
GROUPS = ("near", "far")


@dataclass
class RunResult:
    path: Path
    name: str
    dataset: str
    method: str
    split: str
    seed: int
    protocol: str
    summary: dict | None  # None: started, not finished
    backbone: str = "?"
    fingerprint: str = ""  # of the config without split and seed: the experiment
    evaluation: str = "final"  # or "re-evaluation" (summary_test.json, the latest --test)
    written: float = 0.0  # when the summary was written (newest wins among duplicates)

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.dataset, self.method, self.split, self.seed)

    @property
    def experiment(self) -> tuple[str, str, str, str, str]:
        return (self.dataset, self.method, self.backbone, self.protocol, self.fingerprint)


def _split_of(data: dict) -> str:
    """The split as `tracking.split_name` names it, from a saved config's data section."""
    if data.get("split_file"):
        return Path(str(data["split_file"])).stem
    if data.get("known"):
        return "known/" + "-".join(str(k) for k in data["known"])
    return str(data.get("split", "default"))


def _result(path: Path, config: dict, summary: dict | None, evaluation: str = "final",
            written: float = 0.0) -> RunResult:
    data, model, run = config.get("data", {}), config.get("model", {}), config.get("run", {})
    return RunResult(path=path, name=str(run.get("name", path.name)), dataset=str(data.get("dataset", "?")),
                     method=str(model.get("head", "?")), split=_split_of(data), seed=int(run.get("seed", 0)),
                     protocol=str(config.get("eval", {}).get("protocol", "clean")), summary=summary,
                     backbone=str(model.get("backbone", "?")), fingerprint=experiment_fingerprint(config),
                     evaluation=evaluation, written=written)


def _read_json(path: Path) -> dict:
    value = json.loads(path.read_text())
    if not isinstance(value, dict):
        raise json.JSONDecodeError("not a JSON object", path.read_text()[:20], 0)
    return value


def read_run_folder(path: str | Path) -> RunResult | None:
    """A run folder's result (None when `path` holds no config.yaml, i.e. is no run folder):
    summary.json, or the re-evaluation summary_test.json when that is newer."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        return None
    candidates = [(f.stat().st_mtime, kind, f) for kind, f in (("final", path / "summary.json"),
                                                             ("re-evaluation", path / "summary_test.json"))
                  if f.is_file()]
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        if not candidates:
            return _result(path, config, None)
        written, kind, file = max(candidates, key=lambda c: c[0])
        return _result(path, config, _read_json(file), kind, written)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise DataError(f"unreadable run record in {path}: {err}; delete or repair the file") from None


def _unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return out


def read_wandb_run(path: str | Path, prefix: str = "final") -> RunResult | None:
    """A run's result from its latest offline W&B run: the config W&B holds and the summary
    keys logged under `prefix/` (unfinished when there are none)."""

    path = Path(path)
    runs = find_offline_runs(path) if not path.name.startswith("offline-run-") else [path]
    if not runs:
        return None
    record = read_offline_run(runs[-1])
    # the settings (`section/key`, the whole config since issue 19), without W&B's own `_wandb/...`
    # and the run extras (split, world size, git revision): the same experiment fingerprint as the folder's
    config = _unflatten({k: v for k, v in record.config.items() if "/" in k and not k.startswith("_")})
    flat = {}

    def walk(node: dict, name: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict) and "_type" not in v:
                walk(v, f"{name}/{k}" if name else k)
            else:
                flat[f"{name}/{k}" if name else k] = v

    walk(record.summary, "")
    summary = _unflatten({k[len(prefix) + 1:]: v for k, v in flat.items() if k.startswith(prefix + "/")})
    folder = path.parent.parent if path.name.startswith("offline-run-") else path
    return _result(folder, config, with_config_ood_order(summary, config) if summary else None)


def with_config_ood_order(summary: dict, config: dict) -> dict:
    """A summary read back from W&B, made like summary.json: its OOD sets in the config's `data.ood`
    order (W&B's summary file keeps no key order: the OpenOOD layout's columns would come in any
    order) and each near/far group's `sets` list (W&B keeps numbers only, so the near/far means of
    the baseline scores could not be formed) from the sets' `group` there."""
    ood = summary.get("ood")
    if not isinstance(ood, dict):
        return summary
    entries = [e for e in (config.get("data", {}).get("ood") or []) if isinstance(e, dict) and e.get("name") in ood]
    order = [e["name"] for e in entries] + [name for name in ood if name not in {e["name"] for e in entries}]
    group_of = {e["name"]: e.get("group") or "far" for e in entries}
    out = {**summary, "ood": {name: ood[name] for name in order}}
    groups = {g: dict(v) for g, v in (summary.get("ood_groups") or {}).items() if isinstance(v, dict)}
    for group, means in groups.items():
        if "sets" not in means and len(group_of) == len(order):  # every set's group is known
            unknowns = [TEST_UNKNOWNS] if group == "near" and (summary.get("num_test_unknown") or 0) > 0 else []
            means["sets"] = unknowns + [name for name in order if group_of[name] == group]
    if groups:
        out["ood_groups"] = groups
    return out


def scan(paths: Iterable[str | Path], source: str = "folders", wandb_prefix: str = "final") -> list[RunResult]:
    """Results of every run folder given or directly inside a given folder (source: folders | wandb)."""
    reader = read_run_folder if source == "folders" else (lambda p: read_wandb_run(p, wandb_prefix))
    if source not in ("folders", "wandb"):
        raise ValueError(f"source must be 'folders' or 'wandb', got {source!r}")
    out = []
    for base in map(Path, paths):
        if not base.is_dir():
            raise DataError(f"{base} is not a folder; pass run folders or the folder that holds them (e.g. runs/)")
        candidates = [base] if (base / "config.yaml").is_file() else sorted(p for p in base.iterdir() if p.is_dir())
        out.extend(r for r in map(reader, candidates) if r is not None)
    return out


def _node(summary: dict, score: str, eval_set: str) -> dict | None:
    node = summary if eval_set in ("test", TEST_UNKNOWNS) else (summary.get("ood") or {}).get(eval_set)
    if not isinstance(node, dict):
        return None
    if score not in ("primary", node.get("score")):
        node = (node.get("baselines") or {}).get(score)
    return node if isinstance(node, dict) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def metric_value(summary: dict, metric: str, score: str = "primary", eval_set: str = "test") -> float | None:
    """One number of a summary: `score` "primary" (or the run's primary score name) reads the
    top level, another score its `baselines` entry; `eval_set` "test", an OOD set name, or
    "near" / "far": the mean over that group's sets (the split's unknowns among them), for
    any score (the summary's own group means hold the primary score only)."""
    if eval_set in GROUPS:
        group = (summary.get("ood_groups") or {}).get(eval_set) or {}
        sets = group.get("sets") or []
        if not sets and score == "primary":  # W&B's summary keeps the group's numbers, not its list of sets
            return _number(group.get(metric))
        values = [metric_value(summary, metric, score, s) for s in sets]
        return sum(values) / len(values) if values and None not in values else None
    node = _node(summary, score, eval_set)
    return None if node is None else _number(node.get(metric))


@dataclass
class Cell:
    values: list[float]
    expected: int | None = None
    runs: list[str] = field(default_factory=list)
    reevaluated: bool = False  # a value comes from a re-evaluation (summary_test.json)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof 1) over splits/seeds; NaN for one value."""
        n = len(self.values)
        if n < 2:
            return float("nan")
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (n - 1))

    @property
    def incomplete(self) -> bool:
        return self.expected is not None and len(self.values) < self.expected


Experiment = tuple[str, str, str, str, str]  # dataset, method, backbone, protocol, fingerprint


@dataclass
class Table:
    layout: str
    rows: list[tuple[Experiment, str]]  # (experiment, score)
    columns: list[tuple[str, str]]  # (evaluation set, metric)
    cells: dict[tuple[tuple[Experiment, str], tuple[str, str]], Cell]
    missing: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    reevaluated: list[str] = field(default_factory=list)
    runs: dict[Experiment, list[RunResult]] = field(default_factory=dict)


def _valid_names(finished: Sequence[RunResult]) -> tuple[set[str], set[str], list[str]]:
    """Metrics, scores and evaluation sets the finished summaries hold."""
    metrics, scores, sets = set(), {"primary"}, ["test", *GROUPS]
    for r in finished:
        nodes = [r.summary, *(r.summary.get("ood") or {}).values()]
        for node in (n for n in nodes if isinstance(n, dict)):
            scores.add(str(node.get("score", "primary")))
            scores.update((node.get("baselines") or {}).keys())
            for sub in [node, *(node.get("baselines") or {}).values()]:
                metrics.update(k for k, v in sub.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                               and not k.startswith("num_") and k != "threshold")
                metrics.update(k for k, v in sub.items() if v is None)
        sets += [s for s in (r.summary.get("ood") or {}) if s not in sets]
    return metrics, scores, sets


def _check(kind: str, asked: Iterable[str], valid: Iterable[str]) -> None:
    bad = [a for a in asked if a not in valid]
    if bad:
        raise ConfigError(f"unknown {kind} {', '.join(map(repr, bad))}; the runs found hold: "
                          f"{', '.join(sorted(valid))}")


def _deduplicate(finished: list[RunResult]) -> tuple[list[RunResult], list[str]]:
    """One result per (experiment, split, seed): the newest; the others are reported."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in finished:
        groups.setdefault((r.experiment, r.split, r.seed), []).append(r)
    kept, notes = [], []
    for (exp, split, seed), found in groups.items():
        found = sorted(found, key=lambda r: r.written)
        kept.append(found[-1])
        if len(found) > 1:
            notes.append(f"{exp[0]}/{exp[1]} split {split} seed {seed} found {len(found)} times "
                         f"({', '.join(str(r.path) for r in found)}); counted once: {found[-1].path}")
    return kept, notes


def _openood_sets(finished: Sequence[RunResult]) -> list[str]:
    """The OOD sets in report order: the split's unknowns (when a run has them), then every OOD set."""
    sets = []
    for r in finished:
        if (r.summary.get("num_test_unknown") or 0) > 0 and TEST_UNKNOWNS not in sets:
            sets.insert(0, TEST_UNKNOWNS)
        sets += [s for s in (r.summary.get("ood") or {}) if s not in sets]
    return sets


def build_table(results: Sequence[RunResult], metric: str = "auroc", scores: Sequence[str] = ("primary",),
                eval_set: str = "test", expected: Sequence[RunSpec] | None = None,
                layout: str = "single") -> Table:
    """Aggregate finished runs per (experiment, score); list missing, unfinished, duplicated
    and re-evaluated runs.

    With `expected` (a sweep grid), only its runs count and absent ones are listed as
    missing; cells with fewer values than expected are marked incomplete.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is unknown; valid: {', '.join(LAYOUTS)}")
    found = {r.key for r in results}
    if expected is not None:
        wanted = {(s.dataset, s.method, s.split, s.seed) for s in expected}
        results = [r for r in results if r.key in wanted]
        missing = [s.name for s in expected if (s.dataset, s.method, s.split, s.seed) not in found]
    else:
        missing = []
    unfinished = sorted(r.name for r in results if r.summary is None)
    finished, duplicates = _deduplicate([r for r in results if r.summary is not None])
    if finished:
        metrics, valid_scores, sets = _valid_names(finished)
        _check("score(s)", scores, valid_scores)
        if layout == "single":
            _check("metric", [metric], metrics)
            _check("evaluation set", [eval_set], sets)
    if layout == "single":
        columns = [(eval_set, metric)]
    else:
        columns = [(s, m) for s in [*_openood_sets(finished), *GROUPS] for m in OPENOOD_METRICS]
    runs: dict[Experiment, list[RunResult]] = {}
    for r in sorted(finished, key=lambda r: (r.experiment, r.split, r.seed)):
        runs.setdefault(r.experiment, []).append(r)
    count: dict[tuple[str, str], int] = {}
    for spec in expected or ():
        count[(spec.method, spec.dataset)] = count.get((spec.method, spec.dataset), 0) + 1
    rows = [(exp, score) for exp in runs for score in scores]
    cells: dict = {}
    for exp, score in rows:
        for column in columns:
            cell = Cell([], count.get((exp[1], exp[0])) if expected else None)
            for r in runs[exp]:
                value = metric_value(r.summary, column[1], score, column[0])
                if value is not None:
                    cell.values.append(value)
                    cell.runs.append(r.name)
                    cell.reevaluated |= r.evaluation != "final"
            cells[((exp, score), column)] = cell
    reevaluated = sorted(r.name for r in finished if r.evaluation != "final")
    return Table(layout, rows, columns, cells, missing, unfinished, duplicates, reevaluated, runs)


def _fmt(cell: Cell, digits: int, scale: float, latex: bool = False) -> str:
    if not cell.values:
        return "-"
    mean = f"{cell.mean * scale:.{digits}f}"
    text = mean if math.isnan(cell.std) else (f"{mean} \\pm {cell.std * scale:.{digits}f}" if latex
                                              else f"{mean} ± {cell.std * scale:.{digits}f}")
    text = f"${text}$" if latex else text
    return text + ("*" if cell.incomplete else "") + ("†" if cell.reevaluated and not latex else "")


ID_COLUMNS = ("dataset", "method", "backbone", "protocol", "fingerprint", "score", "n")


def _id_cells(table: Table, row: tuple[Experiment, str]) -> list[str]:
    (dataset, method, backbone, protocol, fingerprint), score = row
    return [dataset, method, backbone, protocol, fingerprint[:8], score, str(len(table.runs[row[0]]))]


def _column_label(column: tuple[str, str]) -> str:
    return f"{column[0]} {column[1]}"


def _notes(table: Table) -> list[str]:
    what = (f"{table.columns[0][1]} on {table.columns[0][0]}" if table.layout == "single" else
            "OpenOOD v1.5 layout: AUROC and FPR95 (fpr95_ood_pos: OOD positive) per OOD set, near/far = mean "
            "over the group's sets")
    notes = [f"{what}; one row per experiment (data set, method, backbone, protocol, config fingerprint without "
             "split and seed); mean ± sample std over its splits and seeds (n runs); one final number per run, "
             "none chosen by a test metric."]
    if any(c.incomplete for c in table.cells.values()):
        notes.append("* fewer finished runs than the grid expects.")
    if table.reevaluated:
        notes.append(f"† includes re-evaluations (summary_test.json, newer than the run's summary.json) "
                     f"({len(table.reevaluated)}): {', '.join(table.reevaluated)}")
    if table.duplicates:
        notes.append(f"duplicates ({len(table.duplicates)}): " + "; ".join(table.duplicates))
    if table.missing:
        notes.append(f"missing runs ({len(table.missing)}): {', '.join(table.missing)}")
    if table.unfinished:
        notes.append(f"unfinished runs ({len(table.unfinished)}): {', '.join(table.unfinished)}")
    return notes


def _csv(table: Table, per_run: bool) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    if per_run:
        writer.writerow(["run", "dataset", "method", "backbone", "protocol", "fingerprint", "split", "seed",
                         "evaluation", "score", "set", "metric", "value"])
        for exp, score in table.rows:
            for r in table.runs[exp]:
                for column in table.columns:
                    value = metric_value(r.summary, column[1], score, column[0])
                    writer.writerow([r.name, *exp, r.split, r.seed, r.evaluation, score, *column,
                                     "" if value is None else f"{value:.6g}"])
        return buf.getvalue()
    writer.writerow(["run", "dataset", "method", "backbone", "protocol", "fingerprint", "score", "set", "metric",
                     "mean", "std", "n", "expected"])
    for row in table.rows:
        for column in table.columns:
            cell = table.cells[(row, column)]
            writer.writerow([";".join(cell.runs), *row[0], row[1], *column,
                             f"{cell.mean:.6g}" if cell.values else "",
                             f"{cell.std:.6g}" if len(cell.values) > 1 else "", len(cell.values),
                             "" if cell.expected is None else cell.expected])
    return buf.getvalue()


def render(table: Table, fmt: str = "markdown", digits: int = 3, scale: float = 1.0, per_run: bool = False) -> str:
    """The table as markdown | csv | latex; notes (protocol, duplicates, re-evaluations,
    missing, unfinished) follow it. CSV: one line per cell (its runs joined by ';') or, with
    `per_run`, one line per run and cell."""
    if fmt == "csv":
        return _csv(table, per_run)
    ids = list(ID_COLUMNS)
    labels = [_column_label(c) for c in table.columns]
    if fmt == "latex":
        esc = lambda text: str(text).replace("_", "\\_")  # noqa: E731
        lines = ["\\begin{tabular}{" + "l" * len(ids) + "c" * len(labels) + "}", "\\toprule",
                 " & ".join(esc(c) for c in ids + labels) + " \\\\", "\\midrule"]
        for row in table.rows:
            cells = [_fmt(table.cells[(row, c)], digits, scale, latex=True) for c in table.columns]
            lines.append(" & ".join([esc(c) for c in _id_cells(table, row)] + cells) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines + ["% " + n for n in _notes(table)]) + "\n"
    if fmt != "markdown":
        raise ConfigError(f"format {fmt!r} is unknown; valid: markdown, csv, latex")
    lines = ["| " + " | ".join(ids + labels) + " |", "|" + "---|" * (len(ids) + len(labels))]
    for row in table.rows:
        cells = [_fmt(table.cells[(row, c)], digits, scale) for c in table.columns]
        lines.append("| " + " | ".join(_id_cells(table, row) + cells) + " |")
    return "\n".join(lines + [""] + _notes(table)) + "\n"
