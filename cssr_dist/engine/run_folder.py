"""The run folder `runs/<name>/`, owned by the engine: lock, config fingerprint, the decision to
start fresh or resume, and the files a run leaves (config.yaml, environment.json,
history.jsonl, summary.json, metrics.md).

The folder is the source of truth of a run; W&B (tracking.py) mirrors it. Checkpoint files
themselves are written and read by `checkpoint.py`; which checkpoint a start resumes from,
and whether it may, is decided here (`RunFolder.check_training_start`).
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import platform
import socket
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..config import Config, OodSetConfig, dump_yaml, to_dict
from ..errors import ConfigError, DataError
from ..tracking import git_revision
from .checkpoint import CheckpointUnusable, check_fingerprint, list_checkpoints, read_trainer_state

PACKAGES = ("torch", "torchvision", "timm", "accelerate", "webdataset", "wandb", "numpy", "scikit-learn")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


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


#: Keys that tell the splits and seeds of one experiment apart (result tables average over them).
SPLIT_AND_SEED = ("data.split", "data.split_file", "data.known", "data.unknown", "run.seed")


def _tree_hash(tree: dict, drop: tuple[str, ...]) -> str:
    """16 hex digits of a config tree without the `drop` keys and without where OOD sets are stored."""
    tree = copy.deepcopy(tree)
    for key in drop:
        *parents, leaf = key.split(".")
        node = tree
        for name in parents:
            node = node.get(name, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    data = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    if isinstance(data.get("ood"), list):  # each entry with all its fields: config.yaml leaves out those
        # its format never reads (config.dump_yaml); a saved config and the same one in memory hash alike
        data["ood"] = [{**dataclasses.asdict(OodSetConfig()), **entry} if isinstance(entry, dict) else entry
                       for entry in data["ood"]]
        for entry in data["ood"]:
            if isinstance(entry, dict):
                entry.pop("root", None), entry.pop("shards", None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_fingerprint(cfg: Config) -> str:
    """Hash of the settings that change training (data selection, model, optim, schedule, seed).

    Stored in every checkpoint and in best/, so a resume with other settings is refused
    instead of mixing two configs in one run. A split file counts by content, not path.
    """
    tree = to_dict(cfg)
    split_file = cfg.data.split_file
    if split_file and Path(split_file).is_file():
        tree["data"]["split_file"] = hashlib.sha256(Path(split_file).read_bytes()).hexdigest()
    return _tree_hash(tree, NOT_FINGERPRINTED)


def experiment_fingerprint(config: dict) -> str:
    """The fingerprint of a saved config (config.yaml as a dict) without split and seed: runs
    that share it are the splits and seeds of ONE experiment (`apps/results.py` averages over them)."""
    return _tree_hash(config, NOT_FINGERPRINTED + SPLIT_AND_SEED)


def _holder_line(fd: int) -> str:
    """What the lock's holder wrote into the lock file (pid, host, since when)."""
    return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"


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
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / self.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder_line(fd)
            os.close(fd)
            raise ConfigError(f"run folder {self.path} is in use by another job ({holder}); wait for it to end "
                              "or choose another run.name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self._lock_fd = fd

    def holder(self) -> str | None:
        """The holder's line when another process holds this run folder's lock, else None.
        Read-only (the pre-flight's question): creates nothing, and a free lock is taken only for
        the instant of the probe (closing the descriptor releases it)."""
        try:
            fd = os.open(self.path / self.LOCK_FILE, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return _holder_line(fd)
        finally:
            os.close(fd)
        return None

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
