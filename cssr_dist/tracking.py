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
from typing import Any

from .config import Config, dump_yaml

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


def wandb_init_kwargs(cfg: Config, run_dir: Path, run_id: str) -> dict[str, Any]:
    """Keyword arguments for `wandb.init`, resuming the same W&B run after a restart."""
    return {
        "name": cfg.run.name,
        "id": run_id,
        "resume": "allow",
        "dir": str(run_dir),
        "mode": wandb_mode(),
        "entity": cfg.tracking.entity,
        "group": cfg.tracking.group,
        "tags": list(cfg.tracking.tags) or None,
        "settings": {"silent": True},
    }


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


class RunFolder:
    """Writes the files of `runs/<name>/`; only the main process calls the writers."""

    def __init__(self, cfg: Config):
        self.path = Path(cfg.run.output_dir) / cfg.run.name
        self.checkpoints = self.path / "checkpoints"

    def create(self) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    def write_config(self, cfg: Config) -> None:
        (self.path / "config.yaml").write_text(dump_yaml(cfg))

    def write_environment(self, record: dict) -> None:
        (self.path / "environment.json").write_text(json.dumps(record, indent=2))

    def append_history(self, row: dict) -> None:
        with open(self.path / "history.jsonl", "a") as fh:
            fh.write(json.dumps(_json_safe(row)) + "\n")

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
