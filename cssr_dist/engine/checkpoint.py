"""Checkpoints: Accelerate `save_state` folders written atomically, the last k kept, plus `best`.

A checkpoint folder is complete or absent: it is written under a temporary name and
renamed, so a job killed mid-write (preemption, kill -9) resumes from the previous one.
`best/` holds only weights and score statistics in safetensors (no pickle), chosen on the
validation slice of known classes, never on the test set.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import DataError

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class TrainerState:
    """Position of training; saved beside the Accelerate state so resume continues exactly."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_value: float | None = None
    best_epoch: int | None = None
    wandb_run_id: str | None = None
    finished: bool = False
    epoch_loss_sum: float = 0.0  # rank-mean loss summed over this epoch's steps so far, so that a
    epoch_loss_steps: int = 0    # resumed epoch reports the mean over ALL its steps
    history: list[dict] = field(default_factory=list)


def _ckpt_name(global_step: int) -> str:
    return f"step_{global_step:09d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (those holding a trainer state), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(accelerator, root: Path, state: TrainerState, keep_last: int) -> Path:
    """Save Accelerate state + trainer state atomically; prune to the newest `keep_last`."""
    final = root / _ckpt_name(state.global_step)
    tmp = root / f".tmp_{final.name}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-max(1, keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> TrainerState:
    """Restore model/optimizer/scheduler/RNG/registered objects and the trainer state."""
    accelerator.load_state(str(path))
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


def save_weights(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Weights + statistics as safetensors, written atomically (main process only)."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"meta": json.dumps(meta)})
    tmp.replace(path / WEIGHTS_FILE)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Safe load (no unpickling) of a `save_weights` folder."""
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise DataError(f"no weights at {file}; train the run first or pass the right run.name")
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
    return load_file(str(file)), meta
