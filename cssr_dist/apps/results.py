"""Paper-style result tables from finished runs: rows methods (x scores), columns data sets,
cells mean +- std over splits (and seeds).

Sources: run folders (`config.yaml` + `summary.json`, the source of truth) or the offline
W&B files inside them (`wandb/offline-run-*`, read by :mod:`cssr_dist.wandb_offline`).
Every run contributes the ONE number its final summary holds, produced under its own
protocol's model selection (validation or last epoch): nothing here chooses an epoch, a
checkpoint or a seed by a test metric. Runs that were expected (a sweep grid) but are
missing, or started but unfinished, are listed under the table instead of silently
shrinking a mean.

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

from ..errors import DataError
from ..wandb_offline import find_offline_runs, read_offline_run
from .sweep import RunSpec

__all__ = ["RunResult", "read_run_folder", "read_wandb_run", "scan", "metric_value", "Table", "build_table",
           "render"]


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

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.dataset, self.method, self.split, self.seed)


def _split_of(data: dict) -> str:
    """The split as `tracking.split_name` names it, from a saved config's data section."""
    if data.get("split_file"):
        return Path(str(data["split_file"])).stem
    if data.get("known"):
        return "known/" + "-".join(str(k) for k in data["known"])
    return str(data.get("split", "default"))


def _result(path: Path, config: dict, summary: dict | None) -> RunResult:
    data, model, run = config.get("data", {}), config.get("model", {}), config.get("run", {})
    return RunResult(path=path, name=str(run.get("name", path.name)), dataset=str(data.get("dataset", "?")),
                     method=str(model.get("head", "?")), split=_split_of(data), seed=int(run.get("seed", 0)),
                     protocol=str(config.get("eval", {}).get("protocol", "clean")), summary=summary)


def read_run_folder(path: str | Path) -> RunResult | None:
    """A run folder's result (None when `path` holds no config.yaml, i.e. is no run folder)."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        return None
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        summary_file = path / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise DataError(f"unreadable run record in {path}: {err}; delete or repair the file") from None
    return _result(path, config, summary)


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
    config = _unflatten({k: v for k, v in record.config.items() if not k.startswith("_")})
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
    return _result(folder, config, summary or None)


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


def metric_value(summary: dict, metric: str, score: str = "primary", eval_set: str = "test") -> float | None:
    """One number of a summary: `score` "primary" (or the run's primary score name) reads the
    top level, another score its `baselines` entry; `eval_set` "test" or an OOD set name."""
    node = summary if eval_set == "test" else (summary.get("ood") or {}).get(eval_set)
    if not isinstance(node, dict):
        return None
    if score not in ("primary", node.get("score")):
        node = (node.get("baselines") or {}).get(score)
        if not isinstance(node, dict):
            return None
    value = node.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclass
class Cell:
    values: list[float]
    expected: int | None = None

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


@dataclass
class Table:
    metric: str
    eval_set: str
    rows: list[tuple[str, str]]  # (method, score)
    columns: list[str]  # data sets
    cells: dict[tuple[tuple[str, str], str], Cell]
    missing: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    protocols: list[str] = field(default_factory=list)


def build_table(results: Sequence[RunResult], metric: str, scores: Sequence[str] = ("primary",),
                eval_set: str = "test", expected: Sequence[RunSpec] | None = None) -> Table:
    """Aggregate finished runs per (method, score) x data set; list missing / unfinished runs.

    With `expected` (a sweep grid), only its runs count and absent ones are listed as
    missing; cells with fewer values than expected are marked incomplete.
    """
    found = {r.key: r for r in results}
    if expected is not None:
        wanted = {(s.dataset, s.method, s.split, s.seed) for s in expected}
        results = [r for r in results if r.key in wanted]
        missing = [s.name for s in expected if (s.dataset, s.method, s.split, s.seed) not in found]
    else:
        missing = []
    unfinished = sorted(r.name for r in results if r.summary is None)
    finished = [r for r in results if r.summary is not None]
    methods = list(dict.fromkeys([s.method for s in expected] if expected else sorted({r.method for r in finished})))
    columns = list(dict.fromkeys([s.dataset for s in expected] if expected else sorted({r.dataset for r in finished})))
    rows = [(m, s) for m in methods for s in scores]
    count: dict[tuple[str, str], int] = {}
    for spec in expected or ():
        count[(spec.method, spec.dataset)] = count.get((spec.method, spec.dataset), 0) + 1
    cells: dict = {}
    for method, score in rows:
        for ds in columns:
            values = [v for r in finished if r.method == method and r.dataset == ds
                      for v in [metric_value(r.summary, metric, score, eval_set)] if v is not None]
            cells[((method, score), ds)] = Cell(values, count.get((method, ds)) if expected else None)
    return Table(metric, eval_set, rows, columns, cells, missing, unfinished,
                 sorted({r.protocol for r in finished}))


def _fmt(cell: Cell, digits: int, scale: float, latex: bool = False) -> str:
    if not cell.values:
        return "-"
    mean = f"{cell.mean * scale:.{digits}f}"
    text = mean if math.isnan(cell.std) else (f"{mean} \\pm {cell.std * scale:.{digits}f}" if latex
                                              else f"{mean} ± {cell.std * scale:.{digits}f}")
    text = f"${text}$" if latex else text
    return text + ("*" if cell.incomplete else "")


def _row_label(row: tuple[str, str], table: Table) -> str:
    return row[0] if {s for _, s in table.rows} == {"primary"} else f"{row[0]} / {row[1]}"


def _notes(table: Table) -> list[str]:
    notes = [f"{table.metric} on {table.eval_set}; mean ± sample std over splits (and seeds); protocol(s): "
             f"{', '.join(table.protocols) or '-'}; one final number per run, none chosen by a test metric."]
    if any(c.incomplete for c in table.cells.values()):
        notes.append("* fewer finished runs than the grid expects.")
    if table.missing:
        notes.append(f"missing runs ({len(table.missing)}): {', '.join(table.missing)}")
    if table.unfinished:
        notes.append(f"unfinished runs ({len(table.unfinished)}): {', '.join(table.unfinished)}")
    return notes


def render(table: Table, fmt: str = "markdown", digits: int = 3, scale: float = 1.0) -> str:
    """The table as markdown | csv | latex; notes (protocol, missing, unfinished) follow it."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["method", "score", "dataset", "metric", "mean", "std", "n", "expected"])
        for row in table.rows:
            for ds in table.columns:
                cell = table.cells[(row, ds)]
                writer.writerow([row[0], row[1], ds, table.metric, f"{cell.mean:.6g}" if cell.values else "",
                                 f"{cell.std:.6g}" if len(cell.values) > 1 else "", len(cell.values),
                                 "" if cell.expected is None else cell.expected])
        return buf.getvalue()
    if fmt == "latex":
        lines = ["\\begin{tabular}{l" + "c" * len(table.columns) + "}", "\\toprule",
                 "Method & " + " & ".join(c.replace("_", "\\_") for c in table.columns) + " \\\\", "\\midrule"]
        for row in table.rows:
            cells = [_fmt(table.cells[(row, ds)], digits, scale, latex=True) for ds in table.columns]
            lines.append(_row_label(row, table).replace("_", "\\_") + " & " + " & ".join(cells) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines + ["% " + n for n in _notes(table)]) + "\n"
    if fmt != "markdown":
        raise ValueError(f"format must be markdown, csv or latex, got {fmt!r}")
    lines = ["| method | " + " | ".join(table.columns) + " |", "|---|" + "---|" * len(table.columns)]
    for row in table.rows:
        lines.append(f"| {_row_label(row, table)} | "
                     + " | ".join(_fmt(table.cells[(row, ds)], digits, scale) for ds in table.columns) + " |")
    return "\n".join(lines + [""] + _notes(table)) + "\n"
