"""Pre-flight: what a run reads and writes, checked on one machine before any node starts.

A cluster job that fails on a wrong `data.root` after N nodes have started (and queued for
hours) wastes the allocation and buries the cause in N logs. `preflight(cfg)` looks at what
the run will need, reading only small files, and returns one line per problem:

* **shard indexes** (`data.format=shards`): the training, test and every OOD set's index is
  read and validated (`read_index`: format, version, fields, counts), its labels file is read,
  and each shard file it lists must exist (local shards);
* **shard counts**: with `world_size` (the job's processes), every shard set must have at
  least one shard per process (each process streams whole shards: with fewer the run stops
  once every node has started; `data/readers/shards.effective_workers`);
* **weights**: `model.pretrained_file` must exist and start with a readable safetensors
  header (or, for .pth/.bin, exist and be readable); `model.pretrained` without a file needs
  timm's local cache to hold the backbone's weights (runs never download);
* **output folders**: `run.output_dir` must be writable (or creatable); the run folder, when
  it exists, must be this run's (same config fingerprint as its checkpoints: a resume) and not
  locked by another job.

Used by `slurm/job.sh` (through `cssr_dist.apps.preflight`, before `srun`) and by
`cssr-sweep --slurm` (before `sbatch`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..config import Config
from ..data.shards.index import local_path, read_index, read_labels, shard_urls
from ..errors import CssrError
from ..models.backbones import resolve_backbone_data_config
from ..models.pretrained import cached_pretrained_file
from .run_folder import RunFolder, config_fingerprint

__all__ = ["preflight", "shard_problems", "weight_problems", "output_problems", "safetensors_header_problem"]


def _shard_sets(cfg: Config) -> list[tuple[str, str]]:
    """(setting, prefix) of every shard set the run reads."""
    sets = [("data.shards.train", cfg.data.shards.train or ""), ("data.shards.test", cfg.data.shards.test or "")]
    sets += [(f"data.ood[{i}] ({e.name or e.shards})", e.shards or "") for i, e in enumerate(cfg.data.ood) if e.shards]
    return sets


def shard_problems(cfg: Config, world_size: int = 1) -> list[str]:
    """Each shard set's index, labels and listed shard files, and at least `world_size` shards
    (one per process); nothing for `data.format=native`."""
    if cfg.data.format != "shards":
        return []
    relative = [prefix for _, prefix in _shard_sets(cfg) if prefix and not Path(prefix).is_absolute()]
    if relative and cfg.data.root and not Path(cfg.data.root).is_dir():  # one line, not one per set
        return [f"data.root: {cfg.data.root} is not a folder; the shard prefixes ({', '.join(relative[:3])}"
                f"{', ...' if len(relative) > 3 else ''}) are looked up there"]
    problems = []
    for setting, prefix in _shard_sets(cfg):
        try:
            index, path = read_index(prefix, cfg.data.root)
            read_labels(index, path)
            urls = shard_urls(index, path, allow_url_schemes=cfg.data.shards.allow_url_schemes)
        except CssrError as err:
            problems.append(f"{setting}: {err}")
            continue
        missing = [u for u in urls if local_path(u) is not None and not Path(local_path(u)).is_file()]
        if missing:
            problems.append(f"{setting}: {len(missing)} of {len(urls)} shard files listed in {path} are missing "
                            f"(e.g. {missing[0]}); copy them next to the index or re-run make_shards")
        elif len(urls) < world_size:
            per_shard = max(1, index.total // world_size)
            problems.append(f"{setting}: {len(urls)} shards in {path} for {world_size} processes (each reads whole "
                            f"shards: one at least); re-run tools/make_shards.py with --samples-per-shard {per_shard} "
                            "or fewer")
    return problems


def safetensors_header_problem(path: Path) -> str | None:
    """None when safetensors' own reader opens `path` and finds tensors listed: the check the
    run's loader makes first, here at the cost of the header alone (the file is mapped, not read)."""
    try:
        with safe_open(str(path), "pt") as stream:
            names = list(stream.keys())
    except OSError as err:
        return f"cannot read {path}: {err.strerror or err}"
    except SafetensorError as err:
        return f"{path} is not a safetensors file ({str(err).splitlines()[0] if str(err) else 'unreadable header'})"
    return None if names else f"{path} is a safetensors file that lists no tensors"


def weight_problems(cfg: Config) -> list[str]:
    """The backbone's weights are where the run will look for them."""
    file = cfg.model.pretrained_file
    if file:
        path = Path(file)
        if not path.is_file():
            return [f"model.pretrained_file: {path} does not exist"]
        if path.suffix == ".safetensors":
            problem = safetensors_header_problem(path)
            return [f"model.pretrained_file: {problem}"] if problem else []
        return [] if os.access(path, os.R_OK) else [f"model.pretrained_file: {path} is not readable"]
    if cfg.model.pretrained and cached_pretrained_file(cfg.model.backbone) is None:
        return [f"model.pretrained: no weights for {cfg.model.backbone!r} in timm's local caches (runs never "
                "download); fetch them once or set model.pretrained_file"]
    return []


def _writable_ancestor(path: Path) -> tuple[Path, bool]:
    """The nearest existing folder at or above `path`, and whether this user may create entries in it."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe, probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def output_problems(cfg: Config) -> list[str]:
    """run.output_dir writable; the run folder this run's own (resume) or new, and not in use."""
    out = Path(cfg.run.output_dir)
    where, ok = _writable_ancestor(out)
    if not ok:
        return [f"run.output_dir: {out} cannot be created or written ({where} is not a writable folder)"]
    folder = RunFolder(cfg)
    if not folder.path.exists():
        return []
    if not (folder.path.is_dir() and os.access(folder.path, os.W_OK | os.X_OK)):
        return [f"run folder {folder.path} is not a writable folder"]
    holder = folder.holder()
    if holder:
        return [f"run folder {folder.path} is in use by another job ({holder}); wait for it or choose another run.name"]
    try:
        resolved = dataclasses.replace(cfg, data=resolve_backbone_data_config(cfg.model, cfg.data))
        folder.check_training_start(resolved, config_fingerprint(resolved))
    except CssrError as err:
        return [str(err)]
    return []


def preflight(cfg: Config, world_size: int = 1) -> list[str]:
    """Every problem found, one line each (empty: the run may start); `world_size`: the job's processes."""
    return [*shard_problems(cfg, world_size), *weight_problems(cfg), *output_problems(cfg)]
