"""Read an offline W&B run (`<run>/wandb/offline-run-*/run-<id>.wandb`) without the network.

wandb >= 0.19 no longer writes `files/wandb-summary.json` or `config.yaml` for offline runs
and no longer ships a Python reader for its `.wandb` record file (its Go core writes it).
The file is a LevelDB-style log (32 KiB blocks; 7-byte chunk headers: CRC32, length, type
FULL/FIRST/MIDDLE/LAST) of protobuf `Record`s, whose schema wandb still ships
(`wandb.proto.wandb_internal_pb2`). This module reads config, history, summary and the
logged artifacts' manifests from it,
so results can be collected from W&B files and tests can check what a run logged.
Nothing is executed or unpickled: values are JSON.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError

__all__ = ["OfflineArtifact", "OfflineRun", "read_offline_run", "find_offline_runs"]

_BLOCK = 32768
_HEADER = 7  # ':W&B' + magic (2 bytes) + version (1 byte)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineArtifact:
    """An artifact the run logged: name, type, aliases, metadata and its files (the manifest's
    `path -> {"digest": base64 MD5, "size": bytes, "local_path": where W&B will upload it from}`)."""

    name: str
    type: str
    aliases: list[str]
    metadata: dict[str, Any]
    files: dict[str, dict[str, Any]]


@dataclass
class OfflineRun:
    """What an offline W&B run logged: flat config, history rows, final summary."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    finished: bool = False  # an exit record was written (the run ended, not killed)
    artifacts: list[OfflineArtifact] = field(default_factory=list)

    def history_keys(self) -> set[str]:
        return {k for row in self.history for k in row}


def _records(data: bytes, where: Path) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise DataError(f"{where} is not a W&B run file (no ':W&B' header)")
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer too short for a header: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def _key(item) -> tuple[str, ...]:
    return tuple(item.nested_key) if item.nested_key else (item.key,)


def _set_nested(target: dict, key: tuple[str, ...], value: Any) -> None:
    for part in key[:-1]:
        target = target.setdefault(part, {})
    target[key[-1]] = value


def read_offline_run(path: str | Path) -> OfflineRun:
    """Parse `offline-run-*/` (the folder) or its `run-*.wandb` file."""
    from wandb.proto import wandb_internal_pb2 as pb  # start-up time: wandb's protobufs only when a file is read

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("run-*.wandb"))
    if not files:
        raise DataError(f"no run-*.wandb file in {path}; is it an offline-run-* folder of W&B?")
    run = OfflineRun(path=path if path.is_dir() else path.parent)
    for raw in _records(files[0].read_bytes(), files[0]):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "config":
            for item in record.config.update:
                run.config["/".join(_key(item))] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({"/".join(_key(i)): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                _set_nested(run.summary, _key(item), json.loads(item.value_json))
        elif kind == "artifact":
            run.artifacts.append(_artifact(record.artifact))
        elif kind == "exit":
            run.finished = True
    return run


def _artifact(record) -> OfflineArtifact:
    return OfflineArtifact(name=record.name, type=record.type, aliases=list(record.aliases),
                           metadata=json.loads(record.metadata) if record.metadata else {},
                           files={e.path: {"digest": e.digest, "size": e.size, "local_path": e.local_path}
                                  for e in record.manifest.contents})


def find_offline_runs(run_dir: str | Path) -> list[Path]:
    """Offline W&B run folders of one run folder, oldest first (a resumed run adds one)."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*"))
