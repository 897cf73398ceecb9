"""Experiment records: W&B through Accelerate's tracker API, plus the local run folder.

The run folder is the source of truth (config, history.jsonl, summary.json, metrics.md,
environment); W&B mirrors it for dashboards. W&B goes offline by itself when no API key is
configured, because wandb with a key but no network blocks for minutes.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import platform
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from accelerate.tracking import WandBTracker

from .config import Config, dump_yaml
from .errors import ConfigError, DataError

PACKAGES = ("torch", "torchvision", "timm", "accelerate", "webdataset", "wandb", "numpy", "scikit-learn")


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
    """Flat run config for W&B (lists as strings) + git revision, split and world size.

    Only the config schema's values go in: no environment variable is read, so no API key
    or other secret can reach the W&B config.
    """
    from .config import to_dict

    config = {k: (str(v) if isinstance(v, list) else v) for k, v in flatten("", to_dict(cfg)).items()}
    config.update({"git_revision": git_revision(), "split": split_name(cfg), "world_size": world_size,
                   "experiment_group": experiment_group(cfg)})
    return config


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
    """

    def __init__(self, project: str):
        super().__init__(project)
        self.failure: str | None = None

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
            import wandb

            wandb.teardown()
        except Exception:  # noqa: BLE001 - the service is gone; nothing left to release
            pass

    def start(self) -> None:
        self._guarded("start", super().start)

    def store_init_configuration(self, values: dict) -> None:
        self._guarded("config", lambda: super(FailSoftWandBTracker, self).store_init_configuration(values))

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self._guarded(f"log at step {step}", lambda: super(FailSoftWandBTracker, self).log(values, step, **kwargs))

    def log_images(self, values: dict, step: int | None = None, **kwargs) -> None:
        self._guarded(f"images at step {step}",
                      lambda: super(FailSoftWandBTracker, self).log_images(values, step, **kwargs))

    def finish(self) -> None:
        self._guarded("finish", super().finish)


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
    import io

    import numpy as np
    import wandb
    from PIL import Image

    from .eval import metrics
    from .eval.plots import histogram_figure, per_class_rows, thin_curve

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


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment_record(cfg: Config, world_size: int) -> dict[str, Any]:
    """What a reader needs to reproduce the run besides the config."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git_revision": git_revision(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "seed": cfg.run.seed,
        "world_size": world_size,
        "argv": sys.argv,
    }


# Config keys that do not change what is trained (where files are, speed, logging, evaluation):
# a resume may change them; anything else changes the fingerprint and is refused.
NOT_FINGERPRINTED = (
    "run.name", "run.output_dir", "run.progress", "run.keep_last", "run.checkpoint_every_steps", "run.max_steps",
    "run.force_resume", "run.force_restart", "run.deterministic", "tracking", "eval", "data.root", "data.num_workers",
    "data.download",
    "data.eval_batch_size", "data.shards.train", "data.shards.test", "data.shards.max_corrupt_fraction",
    "data.shards.allow_url_schemes", "model.compile", "model.channels_last", "model.class_chunk",
)


def config_fingerprint(cfg: Config) -> str:
    """Hash of the settings that change training (data selection, model, optim, schedule, seed).

    Stored in every checkpoint and in best/, so a resume with other settings is refused
    instead of mixing two configs in one run. A split file counts by content, not path.
    """
    import hashlib

    from .config import to_dict

    tree = to_dict(cfg)
    for key in NOT_FINGERPRINTED:
        *parents, leaf = key.split(".")
        node = tree
        for name in parents:
            node = node.get(name, {})
        node.pop(leaf, None)
    for entry in tree.get("data", {}).get("ood", []):
        entry.pop("root", None), entry.pop("shards", None)
    split_file = cfg.data.split_file
    if split_file and Path(split_file).is_file():
        tree["data"]["split_file"] = hashlib.sha256(Path(split_file).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunFolder:
    """The files of `runs/<name>/`: checked before anything is written, never silently overwritten.

    `check_training_start` (every rank, reads only) decides fresh start or resume and refuses
    what would destroy results; `lock` (main process) keeps a second job out for the run's
    life; `write_start_records` writes config.yaml/environment.json on a fresh start only.
    """

    LOCK_FILE = ".lock"

    def __init__(self, cfg: Config):
        self.path = Path(cfg.run.output_dir) / cfg.run.name
        self.checkpoints = self.path / "checkpoints"
        self._lock_fd: int | None = None
        self.start_record: Path | None = None  # what `open` wrote (main process)

    # -- before anything is written
    def open(self, accelerator, cfg: Config, fingerprint: str, environment: dict, test_only: bool = False) -> str:
        """Refuse (one line, nothing written) what would overwrite or mix results; then, on a
        training start, lock the folder for this job and write its start records. Returns the
        kind of start ("test", or what `check_training_start` says).

        Every rank reads the folder itself; only rank 0 locks and writes, and all ranks learn
        whether that worked (else the others would wait for it in the next collective)."""
        if test_only:
            self.check_test_start()  # --test writes summary_test.json only
            return "test"
        start = self.check_training_start(cfg, fingerprint)
        failure = None
        if accelerator.is_main_process:
            try:
                self.lock()
                if start == "restart":
                    self.set_aside_previous()
                self.start_record = self.write_start_records(cfg, environment, start)
            except ConfigError as err:
                failure = str(err)
        if accelerator.num_processes > 1:
            import torch

            flag = torch.tensor([float(failure is not None)], device=accelerator.device)
            if accelerator.reduce(flag, reduction="sum").item() and failure is None:
                failure = f"run folder {self.path} could not be opened on rank 0 (see its error)"
        if failure:
            raise ConfigError(failure)
        return start

    def check_training_start(self, cfg: Config, fingerprint: str) -> str:
        """'fresh' or 'resume'; ConfigError (one line) when starting would overwrite or mix results;
        'restart' instead of that refusal when `run.force_restart` (see `set_aside_previous`)."""
        try:
            return self._training_start(cfg, fingerprint)
        except ConfigError:
            if cfg.run.force_restart:  # only what would be refused restarts: a requeued job still resumes
                return "restart"
            raise

    def _training_start(self, cfg: Config, fingerprint: str) -> str:
        from .engine.checkpoint import (CheckpointUnusable, check_fingerprint, list_checkpoints,
                                        read_trainer_state)

        states = []
        for path in reversed(list_checkpoints(self.checkpoints)):
            try:
                states.append((path, read_trainer_state(path)))
            except CheckpointUnusable:
                continue
        if states:
            path, newest = states[0]
            check_fingerprint(newest.fingerprint, fingerprint, path, cfg.run.force_resume)
            if newest.finished and (self.path / "summary.json").is_file():
                raise ConfigError(f"run folder {self.path} holds a finished run (summary.json); evaluate it with "
                                  "--test, or choose another run.name")
            return "resume"
        trained = self.trained_files()
        if trained:
            raise ConfigError(f"run folder {self.path} holds a trained run ({', '.join(trained)}) and no usable "
                              "checkpoint to resume; nothing was changed. Start over with run.force_restart=true "
                              "(the old files move to <run>/replaced_<N>/), or choose another run.name")
        return "fresh"

    def trained_files(self) -> list[str]:
        """What of a trained run this folder holds (step checkpoints, best/, summary, history)."""
        trained = [name for name, file in (("checkpoints/best", "checkpoints/best/weights.safetensors"),
                                           ("summary.json", "summary.json")) if (self.path / file).exists()]
        if self.checkpoints.is_dir() and any(self.checkpoints.glob("step_*")):
            trained.append("checkpoints/step_*")
        if (self.path / "history.jsonl").is_file() and (self.path / "history.jsonl").stat().st_size:
            trained.append("history.jsonl")
        return trained

    def withdraw_resume_record(self) -> None:
        """A resume that stops before training (no usable checkpoint) leaves no trace of itself."""
        if self.start_record is not None and self.start_record.name.startswith("environment_resume_"):
            self.start_record.unlink(missing_ok=True)
            self.start_record = None

    def set_aside_previous(self) -> Path:
        """`run.force_restart`: move every file of the previous run (all but the lock and
        earlier set-asides) into `<run>/replaced_<N>/`, so the new run starts clean and the old
        one is kept. Main process, under the lock."""
        number = 1
        while (self.path / f"replaced_{number}").exists():
            number += 1
        target = self.path / f"replaced_{number}"
        target.mkdir()
        for entry in sorted(self.path.iterdir()):
            if entry.name != self.LOCK_FILE and not entry.name.startswith("replaced_"):
                entry.rename(target / entry.name)
        print(f"run.force_restart: the previous run of {self.path.name} moved to {target}", flush=True)
        return target

    def check_test_start(self) -> Path:
        """`--test` needs best/; it writes only summary_test.json."""

        best = self.checkpoints / "best"
        if not (best / "weights.safetensors").is_file():
            raise DataError(f"run folder {self.path} has no best checkpoint ({best}/weights.safetensors); train "
                            "the run first or pass the right run.name / run.output_dir")
        return best

    def lock(self) -> None:
        """Hold an exclusive lock on the run folder until this process ends (main process only).

        flock is released by the kernel when the process dies (kill -9 included), so a stale
        lock never blocks a requeued job. On NFS it needs a server with locking (NFSv4).
        """
        import fcntl
        import socket
        import time


        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / self.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise ConfigError(f"run folder {self.path} is in use by another job ({holder}); wait for it to end "
                              "or choose another run.name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # -- writers (main process)
    def create(self) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    def write_start_records(self, cfg: Config, record: dict, kind: str) -> Path:
        """Fresh start: config.yaml + environment.json. Resume: environment_resume_<N>.json with
        the config this job ran with (config.yaml stays the one the run was started with)."""
        self.create()
        if kind in ("fresh", "restart"):
            self.write_config(cfg)
            self.write_environment(record)
            return self.path / "environment.json"
        from .config import to_dict

        number = 1
        while (self.path / f"environment_resume_{number}.json").exists():
            number += 1
        target = self.path / f"environment_resume_{number}.json"
        target.write_text(json.dumps({**record, "config": to_dict(cfg)}, indent=2, default=str))
        return target

    def write_config(self, cfg: Config) -> None:
        (self.path / "config.yaml").write_text(dump_yaml(cfg))

    def write_environment(self, record: dict) -> None:
        (self.path / "environment.json").write_text(json.dumps(record, indent=2))

    def append_history(self, row: dict) -> None:
        with open(self.path / "history.jsonl", "a") as fh:
            fh.write(json.dumps(_json_safe(row)) + "\n")

    def rewrite_history(self, rows: list[dict]) -> None:
        """On resume: history.jsonl = the checkpoint's history (drops rows of epochs after it,
        written before a preemption, that would otherwise appear twice)."""
        tmp = self.path / "history.jsonl.tmp"
        tmp.write_text("".join(json.dumps(_json_safe(row)) + "\n" for row in rows))
        tmp.replace(self.path / "history.jsonl")

    def write_summary(self, summary: dict, name: str = "summary.json") -> None:
        """Atomic (temporary file, then rename); NaN becomes null so the file stays valid JSON."""
        tmp = self.path / f"{name}.tmp"
        tmp.write_text(json.dumps(_json_safe(summary), indent=2, default=str))
        tmp.replace(self.path / name)

    def write_table(self, text: str) -> None:
        (self.path / "metrics.md").write_text(text)

    def read_summary(self) -> dict | None:
        path = self.path / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else None
