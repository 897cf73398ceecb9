"""Experiment records in W&B, through Accelerate's tracker API: naming, the fail-soft tracker,
each evaluation's metrics, ROC, histograms and per-class table.

The run folder (engine/run_folder.py) is the source of truth (config, history.jsonl,
summary.json, metrics.md, environment); W&B mirrors it for dashboards. W&B goes offline by itself when no API key is
configured, because wandb with a key but no network blocks for minutes.
"""

from __future__ import annotations

import errno
import io
import netrc
import os
import shutil
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
from accelerate.tracking import WandBTracker
from PIL import Image

from .config import Config, shown_dict
from .errors import storage_error
from .eval import metrics
from .eval.plots import can_draw_histogram, histogram_figure, per_class_rows, thin_curve
from .eval.report import near_far_table

def wandb_has_api_key() -> bool:
    """True when wandb could authenticate: WANDB_API_KEY or a netrc entry for the API host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def wandb_mode() -> str:
    """Respect an explicit WANDB_MODE; otherwise online only with a key."""
    explicit = os.environ.get("WANDB_MODE")
    if explicit:
        return explicit
    return "online" if wandb_has_api_key() else "offline"


def wandb_available() -> bool:
    try:
        metadata.version("wandb")
    except metadata.PackageNotFoundError:
        return False
    return True


def experiment_group(cfg: Config) -> str:
    """W&B group: one per experiment family (data set x method x protocol), so W&B's grouped
    view averages a method over its splits and seeds and groups compare methods."""
    if cfg.tracking.group:
        return cfg.tracking.group
    suffix = "" if cfg.eval.protocol == "clean" else f"_{cfg.eval.protocol}"
    return f"{cfg.data.dataset}_{cfg.model.head}{suffix}"


def split_name(cfg: Config) -> str:
    """The split as reports name it: the split file's stem, `known/<classes>` for an explicit
    `data.known` (which wins over family/split), or family/split."""
    if cfg.data.split_file:
        return Path(cfg.data.split_file).stem
    if cfg.data.known:
        return "known/" + "-".join(str(k) for k in cfg.data.known)
    return f"{cfg.data.split_family}/{cfg.data.split}"


def wandb_tags(cfg: Config) -> list[str]:
    """Filterable `key:value` tags (data set, split, method, protocol, backbone) + user tags."""
    tags = [f"dataset:{cfg.data.dataset}", f"split:{split_name(cfg)}", f"method:{cfg.model.head}",
            f"protocol:{cfg.eval.protocol}", f"backbone:{cfg.model.backbone}", f"seed:{cfg.run.seed}"]
    return tags + [t for t in cfg.tracking.tags if t not in tags]


def wandb_init_kwargs(cfg: Config, run_dir: Path, run_id: str, job_type: str = "train") -> dict[str, Any]:
    """Keyword arguments for `wandb.init`, resuming the same W&B run after a restart.

    The project is `cfg.tracking.project`, which the tracker holds (`wandb_tracker`), so it is
    not repeated here. `job_type` is "train" or "eval" (evaluation-only runs).
    """
    return {
        "name": cfg.run.name,
        "id": run_id,
        "resume": "allow",
        "dir": str(run_dir),
        "mode": wandb_mode(),
        "entity": cfg.tracking.entity,
        "group": experiment_group(cfg),
        "job_type": job_type,
        "tags": wandb_tags(cfg),
        "settings": {"silent": True},
    }


def wandb_config(cfg: Config, world_size: int | None = None) -> dict[str, Any]:
    """The full run config for W&B, one flat `section/key` entry per setting with its value as
    it is (lists, OOD set entries and nulls included, so every setting can be filtered by), plus
    git revision, split, world size and experiment group.

    Only the config schema's values go in: no environment variable is read, so no API key
    or other secret can reach the W&B config.
    """
    config = config_values("", shown_dict(cfg))  # as config.yaml: no data.ood field the format never reads
    config.update({"git_revision": git_revision(), "split": split_name(cfg), "world_size": world_size,
                   "experiment_group": experiment_group(cfg)})
    return config


def config_values(prefix: str, values: dict) -> dict[str, Any]:
    """Nested config sections -> flat `a/b` keys; every leaf kept as it is (unlike `flatten`,
    which keeps only metric-like scalars)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(config_values(name, value))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


#: below this much free space in the run folder, a W&B write stops the run (FailSoftWandBTracker):
#: W&B's records of one evaluation (plots, tables) take a few hundred kB
WANDB_MIN_FREE_BYTES = 1_000_000


class FailSoftWandBTracker(WandBTracker):
    """Accelerate's W&B tracker whose failures never end the run.

    Slurm signals every process of a job step when it preempts or cancels it (its process
    tracking follows the process tree, so `wandb-core` is hit although W&B starts it in its
    own session); the run's next W&B call then raises `ConnectionResetError` and, unguarded,
    the attempt would die before writing its preemption checkpoint. The run folder is the
    record; W&B mirrors it. So the first failure prints one line, W&B stays off for the rest
    of this attempt, and W&B's exit hook is released (it would print a traceback at exit).
    A requeued attempt starts a fresh service and resumes the same W&B run (same id).

    Accelerate does not pass `init_trackers(init_kwargs=...)` to tracker instances, and the
    run id is known only after the checkpoint is restored: `start_tracking` sets them.

    One failure is not soft: a full disk under W&B's folder (the run folder). W&B's service
    then drops the records without a word (measured: W&B 0.31 offline, a full 4 MB tmpfs,
    200 `log` calls and `finish` all "succeed", the run file stays empty), and the next
    checkpoint would fail on the same disk anyway. So before each write the free space is
    checked (`WANDB_MIN_FREE_BYTES`), and the run stops with the one StorageError line: free
    space, rerun, and the run resumes from its last checkpoint into the same W&B run, which
    gets the steps since then again. `finish` is not checked: the preemption path must end.
    """

    def __init__(self, project: str):
        super().__init__(project)
        self.failure: str | None = None

    def _check_space(self, what: str) -> None:
        """StorageError (one line, the folder, the space) when W&B's folder has no room left."""
        if self.failure is not None:  # W&B is off: it writes nothing
            return
        folder = Path(getattr(self, "init_kwargs", {}).get("dir") or ".")
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return  # no such folder yet: W&B makes it, and its own failure is soft
        if free < WANDB_MIN_FREE_BYTES:
            raise storage_error(OSError(errno.ENOSPC, "too little space left for W&B's records"),
                                f"W&B's {what}", folder / "wandb", WANDB_MIN_FREE_BYTES)

    def _guarded(self, what: str, call: Callable[[], Any]) -> Any:
        if self.failure is not None:
            return None
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - any W&B failure: the run goes on without W&B
            self.failure = f"{type(err).__name__}: {err}"
            print(f"W&B {what} failed ({self.failure}); W&B is off for the rest of this attempt (the run folder "
                  "keeps every record; a restart resumes the W&B run)", file=sys.stderr, flush=True)
            self._release()
            return None

    @staticmethod
    def _release() -> None:
        """Drop W&B's service connection now, so its exit hook does not fail again at exit."""
        try:
            import wandb  # start-up time: wandb loads only when a W&B run exists

            wandb.teardown()
        except Exception:  # noqa: BLE001 - the service is gone; nothing left to release
            pass

    def start(self) -> None:
        self._check_space("start")
        self._guarded("start", super().start)

    def store_init_configuration(self, values: dict) -> None:
        self._check_space("config")
        self._guarded("config", lambda: super(FailSoftWandBTracker, self).store_init_configuration(values))

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self._check_space(f"log at step {step}")
        self._guarded(f"log at step {step}", lambda: super(FailSoftWandBTracker, self).log(values, step, **kwargs))

    def log_images(self, values: dict, step: int | None = None, **kwargs) -> None:
        self._check_space(f"images at step {step}")
        self._guarded(f"images at step {step}",
                      lambda: super(FailSoftWandBTracker, self).log_images(values, step, **kwargs))

    def finish(self) -> None:
        self._guarded("finish", super().finish)

    def update_summary(self, values: dict) -> None:
        """Values for the run's summary that no history row carries (the selected epoch, times)."""
        self._guarded("summary", lambda: self.run.summary.update(values))

    def log_artifact(self, make: Callable[[], Any], aliases: list[str]) -> None:
        """`make()` builds the `wandb.Artifact` (hashing its files) inside the guard too."""
        self._guarded("artifact", lambda: self.run.log_artifact(make(), aliases=aliases))


def wandb_tracker(cfg: Config) -> list[FailSoftWandBTracker] | None:
    """`Accelerator(log_with=...)` for this config: the fail-soft W&B tracker, or None."""
    return [FailSoftWandBTracker(cfg.tracking.project)] if cfg.tracking.wandb and wandb_available() else None


def start_tracking(accelerator, cfg: Config, run_dir: Path, run_id: str) -> None:
    """Open (or resume, same id) the run's W&B run through Accelerate's `init_trackers`."""
    for tracker in accelerator.log_with:
        if isinstance(tracker, FailSoftWandBTracker):
            tracker.init_kwargs = wandb_init_kwargs(cfg, run_dir, run_id)
    accelerator.init_trackers(cfg.tracking.project, config=wandb_config(cfg, accelerator.num_processes))


def stop_tracking(accelerator) -> None:
    """Finish the trackers without ending the process group (preemption: the job exits next)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def _wandb_tracker(accelerator):
    """Accelerate's W&B tracker when it is active on this process, else None."""
    if not getattr(accelerator, "is_main_process", False):
        return None
    return next((t for t in getattr(accelerator, "trackers", []) if getattr(t, "name", None) == "wandb"), None)


def evaluation_payload(summary: dict, scores: dict, labels, prefix: str) -> dict[str, Any]:
    """W&B values of one evaluation: every numeric metric of `summary` (flattened under
    `prefix`), one ROC chart with every score (`<prefix>/roc`), a known-vs-unknown histogram
    per score (`<prefix>/hist/<score>`) and the per-unknown-class AUROC table
    (`<prefix>/tables/per_unknown_class_auroc`; its values are also scalars), and the AUROC of
    every score, the CSSR terms s0/s1/s2 included, under `<prefix>/auroc_by_score/<score>`
    (the summary holds only the primary score and `eval.baselines`)."""
    import wandb  # start-up time: wandb loads only when a W&B run exists

    labels = np.asarray(labels)
    known = labels >= 0
    payload: dict[str, Any] = {k: v for k, v in flatten(prefix, summary).items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    xs, ys, names = [], [], []
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        payload[f"{prefix}/auroc_by_score/{name}"] = metrics.auroc(values[known], values[~known])
        fpr, tpr = metrics.roc_points(values[known], values[~known])
        if fpr.size:
            fx, fy = thin_curve(fpr, tpr)
            xs.append(fx.tolist())
            ys.append(fy.tolist())
            names.append(name)
        if not can_draw_histogram(values):  # no empty plots
            continue
        buf = io.BytesIO()
        histogram_figure(values, labels, f"{name} ({prefix})").savefig(buf, format="png")
        buf.seek(0)
        payload[f"{prefix}/hist/{name}"] = wandb.Image(Image.open(buf), caption=f"{name}: known vs unknown")
    if names:
        payload[f"{prefix}/roc"] = wandb.plot.line_series(xs=xs, ys=ys, keys=names, title=f"ROC ({prefix})",
                                                          xname="FPR")
    per_class = summary.get("per_unknown_class_auroc")
    if per_class:
        payload[f"{prefix}/tables/per_unknown_class_auroc"] = wandb.Table(columns=["unknown_class", "auroc"],
                                                                  data=[list(r) for r in per_class_rows(per_class)])
    return payload


#: The run summary keys (summary.json and W&B) that describe the training rather than an evaluation.
RUN_SUMMARY_KEYS = ("epochs", "best_epoch", "best_selection", "selected_by", "train_time_s", "images_per_s",
                    "world_size")


def record_run_end(accelerator, summary: dict, best_dir: Path) -> bool:
    """At the end of training: the run's W&B summary gets the selected epoch, how it was
    selected, train time and images/s, and the headline AUROC with what it is the AUROC of;
    `best_dir` (checkpoints/best/) becomes a W&B model artifact `model-<run id>` with aliases
    `best` and `epoch-<N>`. No-op (False) unless the W&B tracker is active on this process.

    The artifact refers to the files where they are (`policy="immutable"`): W&B makes no copy
    outside the run folder, offline runs included; `wandb sync` uploads them later, so an
    offline run is synced before its best/ is replaced.
    """
    tracker = _wandb_tracker(accelerator)
    if tracker is None or getattr(tracker, "failure", None) is not None:
        return False
    values = {k: summary[k] for k in RUN_SUMMARY_KEYS if summary.get(k) is not None}
    values.update({f"final/{k}": summary[k] for k in ("headline_auroc", "headline_auroc_of") if k in summary})
    tracker.update_summary(values)
    files = sorted(p for p in Path(best_dir).iterdir() if p.is_file()) if Path(best_dir).is_dir() else []
    if files:
        best = summary.get("best_epoch")
        tracker.log_artifact(lambda: best_artifact(tracker.run.id, files, summary),
                             aliases=["best"] + ([f"epoch-{best}"] if best is not None else []))
    return True


def best_artifact(run_id: str, files: list[Path], summary: dict):
    """`model-<run id>`, type model: the files of best/ in place (no copy), with the selection as metadata."""
    import wandb  # start-up time: wandb loads only when a W&B run exists

    artifact = wandb.Artifact(f"model-{run_id}", type="model",
                              description=f"checkpoints/best/ of run {summary.get('run')}: weights and score "
                                          "statistics (safetensors), for cssr-predict and --test",
                              metadata={k: summary.get(k) for k in ("run", "best_epoch", "best_selection",
                                                                    "selected_by", "epochs")})
    for path in files:
        artifact.add_file(str(path), name=path.name, policy="immutable")
    return artifact


def log_evaluation(accelerator, summary: dict, scores: dict, labels, step: int | None, prefix: str = "test") -> bool:
    """Log one evaluation to W&B (metrics, ROC, histograms, per-class table); no-op unless the
    W&B tracker is active on this process. Returns whether anything was logged.

    `scores` maps a score name (integrated, s0, s1, s2, msp, mls, energy) to its per-sample
    values aligned with `labels` (-1 = unknown); call once per evaluated set (`prefix`
    "test", "ood/<name>", ...).
    """
    tracker = _wandb_tracker(accelerator)
    if tracker is None:
        return False
    payload = evaluation_payload(summary, scores, labels, prefix)
    if step is None:
        # Join the current step's row without advancing W&B's step counter: an evaluation
        # logged with an auto-incremented step (one per set) would push the counter past
        # the trainer's global step, and W&B drops the trainer's next `epoch/*` row.
        tracker.log(payload, step=None, commit=False)
    else:
        tracker.log(payload, step=step)
    return True


def near_far_payload(summary: dict, prefix: str) -> dict[str, Any]:
    """`<prefix>/tables/near_far`: OpenOOD's near/far table of the run (eval.report.near_far_table)
    as a W&B table, the one a user opens in the W&B UI; empty without OOD groups."""
    import wandb  # start-up time: wandb loads only when a W&B run exists

    columns, rows = near_far_table(summary)
    return {f"{prefix}/tables/near_far": wandb.Table(columns=columns, data=rows)} if rows else {}


def log_near_far_table(accelerator, summary: dict, step: int | None, prefix: str = "test") -> bool:
    """Log the near/far table of one evaluation (after its sets, like `log_evaluation`); no-op
    unless the W&B tracker is active and the evaluation has OOD groups."""
    tracker = _wandb_tracker(accelerator)
    payload = near_far_payload(summary, prefix) if tracker is not None else {}
    if not payload:
        return False
    if step is None:
        tracker.log(payload, step=None, commit=False)  # see log_evaluation: the step counter stays
    else:
        tracker.log(payload, step=step)
    return True


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def flatten(prefix: str, values: dict) -> dict[str, float | int | str]:
    """Nested metric dicts -> flat 'a/b' keys as W&B dashboards expect."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(name, value))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
    return flat


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
