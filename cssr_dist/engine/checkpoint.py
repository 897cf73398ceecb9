"""Checkpoints in a format of our own: safetensors + JSON, nothing pickled, never half there.

Why not `accelerator.save_state`: it pickles the optimizer, scheduler, RNG states and
registered objects, and loads them with `weights_only=False`, so a file dropped into a
run folder on shared storage runs code on resume. Here a checkpoint folder holds

    model.safetensors          the unwrapped model's state_dict
    optimizer.safetensors      the optimizer's per-parameter tensors (momentum, Adam moments)
    optimizer.json             its param_groups and any non-tensor per-parameter state
    scheduler.json             the LR scheduler's state_dict (plain numbers)
    stats.safetensors          score statistics (ScoreStatistics buffers)
    rng.<rank>.safetensors     torch (CPU, CUDA) and NumPy generator states of each rank
    rng.<rank>.json            Python's `random` state of each rank
    trainer_state.json         position, best so far, history, config fingerprint (written last)

and loading only parses safetensors and JSON: any other file (a crafted `optimizer.bin`,
`random_states_0.pkl`) is never opened. A folder is written under `.tmp_<name>` and renamed
into place; replacing an existing folder renames the old one aside first and deletes it
only after the new one is in (a crash between the two renames is repaired on the next
start), so there is never a moment without a complete checkpoint. `restore` takes the
newest checkpoint that loads completely and says which newer ones it skipped and why.
`best/` holds only weights and statistics (what `--test` needs), chosen on the validation
slice of known classes, never on the test set; after the final evaluation also the post-hoc
detectors' training sample (`posthoc.*` tensors) when detectors were fitted.

A frozen backbone (`model.freeze_backbone`, cssr_ft) never changes, so neither the step
checkpoints nor `best/` store it: they hold the trained parameters and, in the safetensors
metadata, `frozen_sha256`, the hash of the frozen tensors they need (`frozen_sha256`: the
tensors' names, dtypes, shapes and bytes, in sorted name order). Resume, `--test` and
cssr-predict build the model with its pretrained weights and compare that hash before
touching anything: other weights stop with one line naming both hashes and both sources.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, DataError, FailedOnAnotherRank, storage_error

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "weights.safetensors"
#: best/ tensors of the post-hoc detectors' training sample (docs/posthoc.md); not model state
POSTHOC_PREFIX = "posthoc."
MODEL_FILE, STATS_FILE = "model.safetensors", "stats.safetensors"
OPTIM_TENSORS, OPTIM_JSON, SCHEDULER_JSON = "optimizer.safetensors", "optimizer.json", "scheduler.json"
TMP_PREFIX, ASIDE_PREFIX = ".tmp_", ".old_"
FORCE_HINT = "run.force_resume=true"
RESTART_HINT = "run.force_restart=true"
FROZEN_PREFIX = "backbone."  # OSRModel's backbone: the part model.freeze_backbone freezes
FROZEN_HASH, FROZEN_COUNT, FROZEN_SOURCE = "frozen_sha256", "frozen_tensors", "frozen_source"
WEIGHTS_HINT = ("load the pretrained weights the run was trained with (model.pretrained_file / model.backbone "
                "in its config.yaml)")


@dataclass
class TrainerState:
    """Position of training; saved beside the weights so resume continues exactly."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_value: float | None = None
    best_epoch: int | None = None
    wandb_run_id: str | None = None
    finished: bool = False
    epoch_loss_sum: float = 0.0  # rank-mean loss summed over this epoch's steps so far, so that a
    epoch_loss_steps: int = 0    # resumed epoch reports the mean over ALL its steps
    train_time_s: float = 0.0    # training wall time over all attempts (resumes included)
    history: list[dict] = field(default_factory=list)
    fingerprint: str | None = None  # of the config sections that change training (run_folder.config_fingerprint)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("trainer state is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        state.check()
        return state

    def check(self, schedule: tuple[int, int] | None = None) -> None:
        """Every field's type and range (ValueError naming the field): a crafted or damaged
        trainer_state.json must never steer the loop (a step past the schedule, a string as
        the best value). `schedule` = (epochs, steps per epoch) of this run, when known."""
        for name in ("epoch", "step_in_epoch", "global_step", "epoch_loss_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"trainer state field {name} = {value!r} is not an integer >= 0")
        for name in ("epoch_loss_sum", "train_time_s"):
            if not _is_number(getattr(self, name)):
                raise ValueError(f"trainer state field {name} = {getattr(self, name)!r} is not a finite number")
        if self.train_time_s < 0:
            raise ValueError(f"trainer state field train_time_s = {self.train_time_s!r} is negative")
        if self.best_value is not None and not _is_number(self.best_value):
            raise ValueError(f"trainer state field best_value = {self.best_value!r} is not a finite number")
        if self.best_epoch is not None and not (_is_int(self.best_epoch) and 0 <= self.best_epoch <= self.epoch):
            raise ValueError(f"trainer state field best_epoch = {self.best_epoch!r} is not an epoch in 0..{self.epoch}")
        if not isinstance(self.finished, bool):
            raise ValueError(f"trainer state field finished = {self.finished!r} is not true/false")
        for name in ("wandb_run_id", "fingerprint"):  # the W&B id becomes a folder name
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.isalnum() and len(value) <= 64):
                raise ValueError(f"trainer state field {name} = {value!r} is not a short alphanumeric id")
        if not (isinstance(self.history, list) and all(isinstance(row, dict) for row in self.history)):
            raise ValueError("trainer state field history is not a list of objects")
        if schedule is not None:
            epochs, per_epoch = schedule
            # step_in_epoch == per_epoch is an epoch whose steps are done but whose validation is not
            # (preempted on its last step): the resume validates it, then rolls to (epoch + 1, 0)
            limits = {"epoch": epochs, "step_in_epoch": per_epoch, "global_step": epochs * per_epoch,
                      "epoch_loss_steps": per_epoch}
            for name, top in limits.items():
                if getattr(self, name) > top:
                    raise ValueError(f"trainer state field {name} = {getattr(self, name)} is outside this run's "
                                     f"schedule (at most {top}: {epochs} epochs x {per_epoch} steps)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class CheckpointUnusable(Exception):
    """This checkpoint folder cannot be loaded (missing, truncated or foreign files)."""


class NoUsableCheckpoint(ConfigError):
    """Every checkpoint of a trained run is unusable: stop rather than train over its records."""


class CheckpointMismatch(CheckpointUnusable):
    """The files are fine but do not fit the model built from this config (e.g. another latent_dim)."""


class FrozenWeightsMismatch(CheckpointMismatch):
    """The checkpoint was trained on other frozen (pretrained) backbone weights than the model holds."""


# ---------------------------------------------------------------- frozen backbone: stored as a hash
def frozen_state_keys(model: torch.nn.Module, buffers_change: bool = False) -> list[str]:
    """State-dict keys of a bare model that training never changes: with `freeze_backbone`, every
    backbone entry (parameters without gradients, BatchNorm statistics of a backbone held in eval
    mode); `buffers_change` (eval.recalibrate_bn recomputes BatchNorm statistics) keeps the
    buffers stored. Empty for a trained backbone."""
    if not getattr(model, "freeze_backbone", False):
        return []
    params = {FROZEN_PREFIX + name for name, _ in model.backbone.named_parameters()}
    return sorted(k for k in model.state_dict() if k.startswith(FROZEN_PREFIX) and (k in params or not buffers_change))


def frozen_sha256(state: dict[str, torch.Tensor], keys: list[str]) -> str:
    """sha256 of the tensors `keys` of `state`: for each name in sorted order, the name, dtype and
    shape, then the raw bytes (C order, CPU byte order: little-endian on x86 and ARM).

    Of the tensors, not of a weight file: the weights reach the model from timm's cache or
    model.pretrained_file in either format, converted by cssr-convert-weights or not (a frozen
    random init has no file at all); what a checkpoint needs is exactly these values, and the
    hash at save time also proves that the backbone did not move during training."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _frozen_meta(state: dict[str, torch.Tensor], keys: list[str], source: str) -> dict[str, str]:
    return {FROZEN_HASH: frozen_sha256(state, keys), FROZEN_COUNT: str(len(keys)), FROZEN_SOURCE: source}


def stored_part(loaded: dict[str, torch.Tensor], meta: dict, live: dict[str, torch.Tensor], what: str,
                source: str = "") -> dict[str, torch.Tensor]:
    """The live entries a saved file must hold. A file without some backbone entries and with
    `frozen_sha256` is a frozen-backbone checkpoint: the model's own tensors of exactly those
    entries must hash alike (FrozenWeightsMismatch, one line naming both, if not); nothing is
    loaded before this check. Any other file must hold every entry (`_same_keys` says which differ)."""
    missing = sorted(live.keys() - loaded.keys())
    saved = meta.get(FROZEN_HASH)
    if not missing or not isinstance(saved, str) or not all(k.startswith(FROZEN_PREFIX) for k in missing):
        return live
    ours = frozen_sha256(live, missing)
    if ours != saved or str(len(missing)) != str(meta.get(FROZEN_COUNT)):
        raise FrozenWeightsMismatch(
            f"{what} was trained on frozen backbone weights with sha256 {saved[:16]} ({meta.get(FROZEN_COUNT)} tensors, "
            f"{meta.get(FROZEN_SOURCE) or 'source not recorded'}), but the backbone built now has sha256 {ours[:16]} "
            f"({len(missing)} tensors, {source or 'this config'}); nothing was loaded - {WEIGHTS_HINT}")
    return {k: v for k, v in live.items() if k not in missing}


def _ckpt_name(global_step: int) -> str:
    return f"step_{global_step:09d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders that were renamed into place (so finished writing), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_trainer_state(path: Path) -> TrainerState:
    """The trainer state of one checkpoint folder (JSON only: cheap, safe before anything is built)."""
    try:
        return TrainerState.from_json((path / STATE_FILE).read_text())
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointUnusable(f"{STATE_FILE} unreadable ({type(err).__name__}: {err})") from None


def check_fingerprint(saved: str | None, current: str, where: Path, force: bool) -> None:
    """Resume only with the config the checkpoint was trained with (or an explicit override)."""
    if saved is None or saved == current or force:
        return
    raise ConfigError(f"{where} was trained with another config (fingerprint {saved} != {current}: data, model, "
                      f"optim, schedule or seed changed); resume with the run's config.yaml, choose another "
                      f"run.name, or pass {FORCE_HINT} to continue with the new settings")


def recover_interrupted_replace(root: Path) -> list[str]:
    """Undo what a crash in the middle of `_install` left: an old folder renamed aside whose
    replacement never arrived goes back; leftovers of finished replacements and half-written
    `.tmp_` folders go. Main process only; returns what it did."""
    done = []
    if not root.is_dir():
        return done
    for aside in root.glob(ASIDE_PREFIX + "step_*"):
        final = root / aside.name[len(ASIDE_PREFIX):]
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.rename(final)
            done.append(f"restored {final.name} (its replacement was interrupted)")
    for tmp in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"removed the unfinished {tmp.name}")
    return done


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, allow_nan=True))
    _fsync_file(path)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # clone: safetensors refuses tensors sharing storage (tied weights, views)
    try:
        save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, str(path),
                  metadata=metadata)
    except SafetensorError as err:  # its Rust writer reports a full disk as "I/O error: ... (os error 28)"
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
    _fsync_file(path)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointUnusable(f"{path.name} unreadable ({type(err).__name__}: {str(err)[:120]})") from None


def _read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header's string metadata (parsed as JSON by safetensors, never unpickled)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointUnusable(f"{path.name} unreadable ({type(err).__name__}: {str(err)[:120]})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointUnusable(f"{path.name} unreadable ({type(err).__name__}: {str(err)[:120]})") from None


# ---------------------------------------------------------------- optimizer and RNG as tensors + JSON
def optimizer_to_files(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors keyed `state.<param>.<name>`, JSON rest)."""
    tensors, plain = {}, {}
    for param, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{name}"] = value
            else:
                plain.setdefault(str(param), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": plain}


def optimizer_from_files(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for param, values in plain.get("state", {}).items():
        state.setdefault(int(param), {}).update(values)
    for key, value in tensors.items():
        _, param, name = key.split(".", 2)
        state.setdefault(int(param), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def rng_to_files() -> tuple[dict[str, torch.Tensor], dict]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    version, internal, py_gauss = random.getstate()
    plain = {"python": [version, list(internal), py_gauss],
             "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    return tensors, plain


def rng_from_files(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available() and len(tensors["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    n = plain["numpy"]
    np.random.set_state((n["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------- the checkpointer
class Checkpointer:
    """Saves and restores everything a resumed run needs, on one process or under DDP.

    The main process writes the shared files, every rank its own RNG state; all ranks read.
    Collectives (barriers, an all-reduce to agree on which checkpoint loads) are called on
    every rank in the same order, so call `save`/`restore`/`save_best` on all ranks.
    """

    def __init__(self, accelerator, root: Path, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                 stats: torch.nn.Module | None = None, keep_last: int = 2, fingerprint: str | None = None,
                 force_resume: bool = False, log=print, schedule: tuple[int, int] | None = None,
                 frozen_keys: list[str] | tuple[str, ...] = (), weights_source: str = ""):
        """`schedule` = (epochs, optimizer steps per epoch): a checkpoint whose position lies
        outside it is unusable. `frozen_keys` (`frozen_state_keys`): entries stored as a hash
        only; `weights_source` names where they came from (lines and metadata)."""
        self.acc, self.root = accelerator, Path(root)
        self.schedule = schedule
        self.frozen_keys, self.weights_source = list(frozen_keys), weights_source
        self.model, self.optimizer, self.scheduler, self.stats = model, optimizer, scheduler, stats
        self.keep_last, self.fingerprint, self.force_resume = max(1, keep_last), fingerprint, force_resume
        self.log = log
        self.restored_from: Path | None = None

    def for_training(self, model: torch.nn.Module, optimizer, scheduler,
                     schedule: tuple[int, int] | None = None) -> Checkpointer:
        """The same checkpointer over the prepared model, its optimizer and LR schedule
        (`schedule` = (epochs, steps per epoch))."""
        return Checkpointer(self.acc, self.root, model=model, optimizer=optimizer, scheduler=scheduler,
                            stats=self.stats, keep_last=self.keep_last, fingerprint=self.fingerprint,
                            force_resume=self.force_resume, log=self.log, schedule=schedule,
                            frozen_keys=self.frozen_keys, weights_source=self.weights_source)

    # -- saving
    def save(self, state: TrainerState) -> Path:
        """Write a complete checkpoint of `state` and prune to the newest `keep_last`.

        A failed write (disk full, quota, read-only folder, I/O error) on any rank removes the
        unfinished `.tmp_` folder and raises `StorageError` on every rank (one line: folder,
        space needed and free); the previous complete checkpoint is untouched."""
        acc = self.acc
        state.fingerprint = self.fingerprint
        final = self.root / _ckpt_name(state.global_step)
        tmp = self.root / (TMP_PREFIX + final.name)

        def main_makes_tmp() -> None:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)

        def write_parts() -> None:
            rng_tensors, rng_plain = rng_to_files()
            _write_tensors(tmp / f"rng.{acc.process_index}.safetensors", rng_tensors)
            _write_json(tmp / f"rng.{acc.process_index}.json", rng_plain)
            if acc.is_main_process:
                _write_tensors(tmp / MODEL_FILE, *self._stored_model_state())
                if self.optimizer is not None:
                    tensors, plain = optimizer_to_files(self.optimizer.state_dict())
                    _write_tensors(tmp / OPTIM_TENSORS, tensors)
                    _write_json(tmp / OPTIM_JSON, plain)
                if self.scheduler is not None:
                    _write_json(tmp / SCHEDULER_JSON, self.scheduler.state_dict())
                if self.stats is not None:
                    _write_tensors(tmp / STATS_FILE, self.stats.state_dict())

        def main_installs() -> None:
            if acc.is_main_process:
                _write_json(tmp / STATE_FILE, asdict(state))
                _install(tmp, final)
                for old in list_checkpoints(self.root)[:-self.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)

        for phase in (main_makes_tmp, write_parts, main_installs):  # each ends in a collective, like a barrier
            self._written_everywhere(phase, tmp, f"checkpoint {final.name}")
        return final

    def _written_everywhere(self, phase, tmp: Path, what: str) -> None:
        """Run one write phase; if it failed on any rank, every rank raises StorageError."""
        error = None
        try:
            phase()
        except OSError as err:
            error = err
        if self._all_ranks_ok(error is None):
            return
        if self.acc.is_main_process:
            try:  # the unfinished copy; the previous checkpoint stays (a leftover goes on the next start)
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            except OSError:
                pass
        if error is None:
            raise FailedOnAnotherRank(f"cannot write {what} in {self.root}: a write failed on another rank (see its "
                                      "error); the previous checkpoint is intact")
        raise storage_error(error, what, self.root, self._checkpoint_bytes()) from None

    def _checkpoint_bytes(self) -> int:
        """About what one checkpoint needs on disk (tensors; the JSON files are small), twice
        while a checkpoint of the same step is being replaced."""
        parts = [self._stored_model_state()[0]]
        if self.optimizer is not None:
            parts.append(optimizer_to_files(self.optimizer.state_dict())[0])
        if self.stats is not None:
            parts.append(self.stats.state_dict())
        return sum(t.numel() * t.element_size() for part in parts for t in part.values() if t is not None) + 65536

    def _bare_model(self) -> torch.nn.Module:
        """Without DDP and torch.compile wrappers: the same keys whether model.compile is on or not."""
        return self.acc.unwrap_model(self.model, keep_torch_compile=False)

    def _model_state(self) -> dict[str, torch.Tensor]:
        return self._bare_model().state_dict()

    def _stored_model_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
        """What a checkpoint stores of the model: every entry but the frozen ones, plus their hash."""
        state = self._model_state()
        if not self.frozen_keys:
            return state, None
        frozen = set(self.frozen_keys)
        return ({k: v for k, v in state.items() if k not in frozen},
                _frozen_meta(state, self.frozen_keys, self.weights_source))

    # -- restoring
    def restore(self) -> TrainerState | None:
        """Load the newest checkpoint that loads completely; None when there is none.

        A newer one that fails to load is skipped with a line saying why. A checkpoint of
        another config is refused (ConfigError) unless `force_resume`.
        """
        acc = self.acc
        if acc.is_main_process:
            for line in recover_interrupted_replace(self.root):
                self.log(f"checkpoints: {line}")
        acc.wait_for_everyone()
        skipped = []
        for path in reversed(list_checkpoints(self.root)):
            try:
                state = read_trainer_state(path)
                check_fingerprint(state.fingerprint, self.fingerprint or state.fingerprint, path,
                                  self.force_resume)
                loaded = self._read(path, state)
                error = None
            except FrozenWeightsMismatch as err:  # every older checkpoint needs the same weights
                raise ConfigError(f"{err}; or choose another run.name") from None
            except CheckpointMismatch as err:  # a config problem, not damage: never fall back past it
                raise ConfigError(f"checkpoint {path} does not fit the model of this config ({err}); resume with "
                                  "the run's config.yaml or choose another run.name") from None
            except CheckpointUnusable as err:
                error = str(err)
            if not self._all_ranks_ok(error is None):
                skipped.append(f"{path.name} ({error or 'unreadable on another rank'})")
                continue
            self._apply(loaded)
            self.restored_from = path
            if skipped:
                self.log(f"checkpoints: skipped unusable {', '.join(skipped)}; resuming from {path.name}")
            return state
        if skipped:  # a trained run whose every checkpoint is unusable: never train over its records
            raise NoUsableCheckpoint(f"run folder {self.root.parent}: no usable checkpoint ({'; '.join(skipped)}); "
                              f"nothing was changed. Start over with {RESTART_HINT} (the old run is moved to "
                              "<run>/replaced_<N>/) or choose another run.name")
        return None

    def _all_ranks_ok(self, ok: bool) -> bool:
        if self.acc.num_processes == 1:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() == 0)

    def _read(self, path: Path, state: TrainerState) -> dict[str, Any]:
        """Everything of one checkpoint in memory and checked against the live objects, before
        any of them is touched: a bad file leaves the model as it was (and the next one is tried).
        Checked: tensor names, shapes, dtypes, finite values; the optimizer's groups and state
        against the live optimizer; the scheduler and trainer state against the schedule."""
        try:
            state.check(self.schedule)
        except ValueError as err:
            raise CheckpointUnusable(f"{STATE_FILE}: {err}") from None
        if not (path / MODEL_FILE).is_file():
            foreign = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pkl", ".pt", ".pth"))
            hint = f" (holds {', '.join(foreign)}: an older pickled format, never loaded)" if foreign else ""
            raise CheckpointUnusable(f"no {MODEL_FILE}{hint}")
        loaded: dict[str, Any] = {"model": _read_tensors(path / MODEL_FILE)}
        live = stored_part(loaded["model"], _read_metadata(path / MODEL_FILE), self._model_state(),
                           f"checkpoint {path}", self.weights_source)
        _same_keys(loaded["model"], live, MODEL_FILE)
        if self.optimizer is not None:
            loaded["optimizer"] = (_read_tensors(path / OPTIM_TENSORS), _read_json(path / OPTIM_JSON))
            check_optimizer_fits(loaded["optimizer"], self.optimizer)
        if self.scheduler is not None:
            loaded["scheduler"] = _read_json(path / SCHEDULER_JSON)
            check_scheduler_fits(loaded["scheduler"], self.scheduler.state_dict(), state.global_step)
        if self.stats is not None:
            loaded["stats"] = _read_tensors(path / STATS_FILE)
            _same_keys(loaded["stats"], self.stats.state_dict(), STATS_FILE)
        rank = self.acc.process_index
        try:  # optional: a run resumed on more ranks than it was saved from has no state for the new ones
            loaded["rng"] = (_read_tensors(path / f"rng.{rank}.safetensors"), _read_json(path / f"rng.{rank}.json"))
            check_rng_fits(*loaded["rng"])
        except CheckpointUnusable as err:
            self.log(f"checkpoints: RNG state of {path.name} not usable ({err}); continuing with the current one")
            loaded["rng"] = None
        return loaded

    def _apply(self, loaded: dict[str, Any]) -> None:
        _load_part(self._bare_model(), loaded["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(optimizer_from_files(*loaded["optimizer"]))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(loaded["scheduler"])
        if self.stats is not None:
            self.stats.load_state_dict(loaded["stats"])
        if loaded["rng"] is not None:  # checked in _read
            rng_from_files(*loaded["rng"])

    # -- best weights (what --test evaluates)
    def save_best(self, *, epoch: int, best_value: float | None, score: str, name: str = "best",
                  posthoc: dict[str, torch.Tensor] | None = None) -> None:
        """Weights + statistics of the model AS IT IS NOW, labelled with the epoch they are best for;
        `posthoc`: the post-hoc detectors' training sample fitted on these very weights (in the
        same file, so weights and sample are replaced together), which `--test` refits from."""
        def main_writes() -> None:
            if self.acc.is_main_process:
                model_state, frozen = self._stored_model_state()
                tensors = {f"model.{k}": v for k, v in model_state.items()}
                if self.stats is not None:
                    tensors.update({f"stats.{k}": v for k, v in self.stats.state_dict().items()})
                tensors.update({f"{POSTHOC_PREFIX}{k}": v for k, v in (posthoc or {}).items()})
                save_weights(self.root / name, tensors, {"epoch": epoch, "best_value": best_value, "score": score,
                                                         "fingerprint": self.fingerprint, **(frozen or {})})

        self._written_everywhere(main_writes, self.root / name / (WEIGHTS_FILE + ".tmp"), f"{name}/")

    def load_best(self, name: str = "best", posthoc: Callable[[dict, str], Any] | None = None) -> dict:
        """Load `best/` into the model and statistics; returns its metadata (epoch, fingerprint, ...).
        `posthoc(tensors, file)` receives the stored post-hoc sample (names without the prefix)."""
        path = self.root / name
        tensors, meta = load_weights(path)
        apply_best(tensors, self._bare_model(), self.stats, path / WEIGHTS_FILE,
                   "evaluate with the run's own config.yaml (model settings)", meta, self.weights_source)
        if posthoc is not None:
            posthoc({k[len(POSTHOC_PREFIX):]: v for k, v in tensors.items() if k.startswith(POSTHOC_PREFIX)},
                    str(path / WEIGHTS_FILE))
        return meta


def apply_best(tensors: dict[str, torch.Tensor], model: torch.nn.Module, stats: torch.nn.Module | None,
               file: Path, hint: str, meta: dict | None = None, source: str = "") -> None:
    """`best/` tensors (`model.*`, `stats.*`) into a bare model and its score statistics, every
    name and shape checked first, and the hash of a frozen backbone that best/ does not hold
    (`meta`: its metadata; the model must already hold its pretrained weights): one line
    (DataError) when they are another model's, and nothing is loaded unless everything fits.
    The one loader of best/ for training, `--test` and tools/predict.py."""
    parts = []
    for prefix, module, what in (("model.", model, f"{file}"), ("stats.", stats, f"{file} (statistics)")):
        if module is None:
            continue
        part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            live = stored_part(part, meta or {}, module.state_dict(), what, source) if prefix == "model." \
                else module.state_dict()
            _same_keys(part, live, what)
        except FrozenWeightsMismatch as err:
            raise DataError(str(err)) from None
        except CheckpointUnusable as err:  # another model's, or damaged (dtype, NaN)
            raise DataError(f"{err}: the weights do not fit this model; {hint}") from None
        parts.append((module, part))
    for module, part in parts:  # everything checked: now load
        _load_part(module, part)


def _load_part(module: torch.nn.Module, part: dict[str, torch.Tensor]) -> None:
    """Load checked tensors; entries left out are the frozen ones (checked by hash in `stored_part`)."""
    result = module.load_state_dict(part, strict=False)
    if result.unexpected_keys or not all(k.startswith(FROZEN_PREFIX) for k in result.missing_keys):
        raise RuntimeError(f"checked state does not fit: {result}")  # unreachable after _same_keys


def _same_keys(loaded: dict[str, torch.Tensor], live: dict[str, torch.Tensor], what: str) -> None:
    """Names and shapes must match exactly (a changed latent_dim is caught here, in one line)."""
    if loaded.keys() != live.keys():
        extra, missing = sorted(loaded.keys() - live.keys()), sorted(live.keys() - loaded.keys())
        raise CheckpointMismatch(f"{what} does not match the model (unexpected {extra[:3]}, missing {missing[:3]})")
    for key, value in live.items():
        if value is not None and tuple(loaded[key].shape) != tuple(value.shape):
            raise CheckpointMismatch(f"{what}: {key} has shape {tuple(loaded[key].shape)}, the model "
                                     f"{tuple(value.shape)}")
    for key, value in live.items():  # damage, not another config: the previous checkpoint may still fit
        if value is not None and loaded[key].dtype != value.dtype:
            raise CheckpointUnusable(f"{what}: {key} is {loaded[key].dtype}, the model's {value.dtype}")
        _check_finite(loaded[key], f"{what}: {key}")


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
        raise CheckpointUnusable(f"{what} holds NaN or inf values")


def check_optimizer_fits(files: tuple[dict[str, torch.Tensor], Any], optimizer) -> None:
    """optimizer.safetensors + optimizer.json against the live optimizer: the same parameter
    groups (parameter ids, hyperparameter names, numeric values), per-parameter state only
    for existing parameters, tensors shaped like their parameter (or scalars), same dtype, finite."""
    tensors, plain = files
    live = optimizer.state_dict()
    if not (isinstance(plain, dict) and isinstance(plain.get("param_groups"), list)
            and isinstance(plain.get("state", {}), dict)):
        raise CheckpointUnusable(f"{OPTIM_JSON} is not an optimizer state (param_groups, state)")
    groups = plain["param_groups"]
    if len(groups) != len(live["param_groups"]):
        raise CheckpointUnusable(f"{OPTIM_JSON} has {len(groups)} parameter groups, the optimizer "
                                 f"{len(live['param_groups'])}")
    for i, (saved, ours) in enumerate(zip(groups, live["param_groups"])):
        if not isinstance(saved, dict) or saved.keys() != ours.keys() or saved["params"] != ours["params"]:
            raise CheckpointUnusable(f"{OPTIM_JSON} parameter group {i} does not match the optimizer's "
                                     f"(keys or parameters differ)")
        for key, value in saved.items():
            if key != "params" and isinstance(ours[key], (int, float)) and not isinstance(ours[key], bool) \
                    and not _is_number(value):
                raise CheckpointUnusable(f"{OPTIM_JSON} parameter group {i}: {key} = {value!r} is not a finite number")
    params = {pid: p for g, group in zip(optimizer.param_groups, live["param_groups"])
              for pid, p in zip(group["params"], g["params"])}
    for key, value in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) not in params:
            raise CheckpointUnusable(f"{OPTIM_TENSORS}: {key!r} names no parameter of the optimizer")
        param = params[int(parts[1])]
        if value.dim() and tuple(value.shape) != tuple(param.shape):
            raise CheckpointUnusable(f"{OPTIM_TENSORS}: {key} has shape {tuple(value.shape)}, its parameter "
                                     f"{tuple(param.shape)}")
        if value.dim() and value.dtype != param.dtype:
            raise CheckpointUnusable(f"{OPTIM_TENSORS}: {key} is {value.dtype}, its parameter {param.dtype}")
        _check_finite(value, f"{OPTIM_TENSORS}: {key}")
    for pid, values in plain.get("state", {}).items():
        if not (str(pid).isdigit() and int(pid) in params and isinstance(values, dict)):
            raise CheckpointUnusable(f"{OPTIM_JSON}: state of {pid!r} names no parameter of the optimizer")


def check_scheduler_fits(saved: Any, live: dict, global_step: int) -> None:
    """scheduler.json against the live LR schedule: the same fields, numbers where it has
    numbers, and its step count equal to the trainer's (it steps once per optimizer step)."""
    if not isinstance(saved, dict) or saved.keys() != live.keys():
        raise CheckpointUnusable(f"{SCHEDULER_JSON} does not match the LR schedule's fields")
    for key, ours in live.items():
        value = saved[key]
        if isinstance(ours, (int, float)) and not isinstance(ours, bool) and not _is_number(value):
            raise CheckpointUnusable(f"{SCHEDULER_JSON}: {key} = {value!r} is not a finite number")
        if isinstance(ours, list) and not (isinstance(value, list) and len(value) == len(ours)):
            raise CheckpointUnusable(f"{SCHEDULER_JSON}: {key} does not match the LR schedule's")
    if "last_epoch" in live and saved["last_epoch"] != global_step:
        raise CheckpointUnusable(f"{SCHEDULER_JSON} is at step {saved['last_epoch']}, the trainer state at "
                                 f"{global_step}")


def check_rng_fits(tensors: dict[str, torch.Tensor], plain: Any) -> None:
    """The RNG files have the shapes the generators take (checked before any is set)."""
    try:
        ok = (tensors["torch"].dtype == torch.uint8 and tensors["torch"].numel() == torch.get_rng_state().numel()
              and tensors["numpy_keys"].numel() == 624 and isinstance(plain["numpy"]["pos"], int)
              and isinstance(plain["numpy"]["kind"], str) and _is_number(plain["numpy"]["gauss"])
              and len(plain["python"]) == 3 and len(plain["python"][1]) == len(random.getstate()[1])
              and all(_is_int(x) for x in plain["python"][1]))
    except (KeyError, TypeError, IndexError):
        ok = False
    if not ok:
        raise CheckpointUnusable("RNG state is malformed")


def _install(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is renamed aside first and deleted last,
    so a complete checkpoint of this step exists at every moment (see recover_interrupted_replace)."""
    aside = final.with_name(ASIDE_PREFIX + final.name)
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
    tmp.rename(final)
    shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------- best/ weights
def save_weights(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Weights + statistics as safetensors, written atomically (main process only)."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (WEIGHTS_FILE + ".tmp")
    _write_tensors(tmp, tensors, metadata={"meta": json.dumps(meta)})
    tmp.replace(path / WEIGHTS_FILE)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Safe load (no unpickling) of a `save_weights` folder."""
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise DataError(f"no weights at {file}; train the run first or pass the right run.name")
    try:
        with safe_open(str(file), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
        if not isinstance(meta, dict):
            raise ValueError("metadata is not an object")
        return load_file(str(file)), meta
    except (OSError, SafetensorError, ValueError) as err:
        raise DataError(f"{file} is unreadable ({type(err).__name__}); it is damaged - retrain or restore it") from None

