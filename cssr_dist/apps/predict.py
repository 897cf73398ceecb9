"""Applying a trained run to new images: known class or `unknown`, with the score behind it.

`cssr-predict --run runs/NAME PATH...` (or `python tools/predict.py`) is the command line.
A run is restored from what its folder holds, read as untrusted data (nothing unpickled,
nothing executed):

* `config.yaml` through the project's config loader (YAML + schema), so the model, the
  head, the score and the TEST transform are exactly the run's;
* `checkpoints/best/weights.safetensors`: the selected weights WITH the score statistics
  fitted for them (S1/S2/integrated need those; safetensors only); a frozen backbone is not
  in it but its hash is: it is built from the pretrained weights the config names and
  checked against that hash (engine/checkpoint.py) before anything is loaded;
* `summary.json`: the threshold of the primary score chosen on the validation slice of
  known classes (TPR `eval.tpr`), the one the run's macro-F1 used. An image is `unknown`
  when its score is below it, exactly as in evaluation (known = score >= threshold).

Inputs are image files, folders (every image below, sorted) or shard prefixes made by
`tools/make_shards.py` (`PREFIX` with `PREFIX.json` beside it; rows are named
`PREFIX#<sample key>`). Images go through the model in batches on any torch device.

Every image is untrusted too: one that cannot be read (unreadable, truncated, not an image,
larger than PIL's `Image.MAX_IMAGE_PIXELS`, i.e. a decompression bomb) gets a row with
`prediction` = `error` and the reason in `error`, and the rest is predicted. Images are
decoded one batch at a time, so memory is bounded by the batch size and that pixel limit.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..config import Config, load_config
from ..data import readers
from ..data.layouts import IMAGE_READ_ERRORS, IMAGE_SUFFIXES, image_files, is_image_name
from ..data.shards.index import read_index, shard_urls
from ..data.shards.samples import CorruptSample, check_members, decode_image, iter_shard
from ..data.transforms import build_transform
from ..engine.build import build_model_and_scorer, weights_source
from ..engine.checkpoint import FROZEN_HASH, WEIGHTS_FILE, apply_best, load_weights
from ..models.backbones import resolve_backbone_data_config
from ..errors import ConfigError, DataError, report

#: Where a run keeps the selected weights + score statistics (engine/checkpoint.py writes it).
BEST_DIR = Path("checkpoints") / "best"
UNKNOWN = "unknown"
ERROR = "error"  # the prediction of an image that could not be read; its reason is in the `error` column
COLUMNS = ("path", "prediction", "score", "threshold", "closed_set_class", "closed_set_index", "error")


# ---------------------------------------------------------------- the restored run
@dataclass
class RestoredRun:
    """A run ready to classify: model + scorer on `device`, test transform, names, threshold."""

    path: Path
    cfg: Config
    model: torch.nn.Module
    scorer: Any
    transform: Any
    class_names: list[str]
    threshold: float
    threshold_source: str  # "validation" (summary.json) or "--threshold"
    device: torch.device

    @property
    def score(self) -> str:
        return self.scorer.primary


def resolve_device(name: str = "auto") -> torch.device:
    """'auto': CUDA, then Apple MPS, then CPU; anything else as torch spells it (cuda:1, cpu)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def read_run_config(run_dir: Path) -> Config:
    """The run's config.yaml through the schema (YAML only: safe_load, never executed)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise DataError(f"{run_dir} is not a run folder (no config.yaml); pass --run runs/<run.name> of a trained run")
    return load_config(path)


def read_summary(run_dir: Path) -> dict:
    """summary.json as a dict ({} when the run never finished); JSON only."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is unreadable ({type(err).__name__}); the run did not finish cleanly") from None
    return summary if isinstance(summary, dict) else {}


def validation_threshold(run_dir: Path, score: str) -> float | None:
    """The primary score's threshold chosen on validation, from summary.json; None when absent."""
    summary = read_summary(run_dir)
    if summary.get("score") != score:
        return None
    value = summary.get("threshold")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def known_class_names(cfg: Config, num_classes: int, run_dir: Path) -> list[str]:
    """Names of the known classes in the model's order (known class i = split.known[i]): the run's
    summary.json `class_names` when recorded, else from the split and the training data's classes."""
    recorded = read_summary(run_dir).get("class_names")
    if isinstance(recorded, list) and len(recorded) == num_classes and all(isinstance(n, str) for n in recorded):
        return list(recorded)
    try:
        names = readers.known_class_names(cfg.data)
    except DataError:  # the training data is not here: the model still predicts, by index
        names = []
    return names if len(names) == num_classes else [f"class_{i}" for i in range(num_classes)]


def read_best(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of best/ (safetensors: nothing unpickled); one line when missing or damaged."""
    best = run_dir / BEST_DIR
    if not (best / WEIGHTS_FILE).is_file():
        raise DataError(f"{run_dir} has no best checkpoint ({best}/{WEIGHTS_FILE}); "
                        "train the run to the end of an epoch first")
    return load_weights(best)


def restore_run(run_dir: str | os.PathLike, device: str = "auto", threshold: float | None = None) -> RestoredRun:
    """Model, score statistics, test transform and threshold of a trained run, on `device`."""
    path = Path(run_dir)
    if not path.is_dir():
        raise DataError(f"run folder {path} does not exist; pass --run runs/<run.name>")
    cfg = read_run_config(path)
    cfg.data = resolve_backbone_data_config(cfg.model, cfg.data)  # config.yaml holds them; older runs may not
    torch_device = resolve_device(device)
    tensors, meta = read_best(path)
    # every trained weight comes from best/; a frozen backbone is not in it (its hash is), so only
    # then are the run's pretrained weights built (and checked against the hash by apply_best)
    frozen = FROZEN_HASH in meta
    model_cfg = dataclasses.replace(cfg.model, pretrained=cfg.model.pretrained and frozen,
                                    pretrained_file=cfg.model.pretrained_file if frozen else None, compile=False,
                                    sync_bn=False, channels_last=False)
    # K known classes from the statistics saved beside the weights: no training data needed here
    num_classes = int(tensors["stats.proto_count"].shape[0]) if "stats.proto_count" in tensors \
        else readers.run_split(cfg.data).num_known
    model, scorer = build_model_and_scorer(cfg, num_classes, "cpu", model_cfg, posthoc=False)
    apply_best(tensors, model, scorer.stats, path / BEST_DIR / WEIGHTS_FILE,
               "the folder was mixed from two runs (best/ and config.yaml differ)", meta, weights_source(model_cfg))
    model.to(torch_device).eval()
    scorer.to(torch_device)
    source = "--threshold"
    if threshold is None:
        threshold, source = validation_threshold(path, scorer.primary), "validation"
        if threshold is None:
            raise ConfigError(f"{path} has no validation threshold for its score {scorer.primary} in summary.json "
                              "(trained with data.val_fraction=0, or not finished); pass --threshold VALUE")
    return RestoredRun(path, cfg, model, scorer, build_transform(cfg.data, train=False),
                       known_class_names(cfg, num_classes, path), float(threshold), source, torch_device)


# ---------------------------------------------------------------- inputs
def _is_image(path: Path) -> bool:
    return is_image_name(path.name)


def _shard_index(spec: str) -> Path | None:
    text = os.fspath(spec)
    candidate = Path(text if text.endswith(".json") else text + ".json")
    return candidate if candidate.is_file() else None


def check_inputs(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(kind, path) per input: 'file', 'folder' or 'shards'; DataError naming the first bad one."""
    if not paths:
        raise ConfigError("no input: pass image files, folders or shard prefixes after --run")
    out = []
    for spec in paths:
        path = Path(spec)
        if path.is_file() and _is_image(path):
            out.append(("file", spec))
        elif path.is_dir():
            if not image_files(path):
                raise DataError(f"folder {spec} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out.append(("folder", spec))
        elif _shard_index(spec) is not None:
            out.append(("shards", spec))
        elif path.is_file():
            raise DataError(f"{spec} is not an image ({', '.join(IMAGE_SUFFIXES)}), a folder or a shard prefix")
        else:
            raise DataError(f"{spec} does not exist: pass an image file, a folder of images or a shard prefix "
                            f"(PREFIX with PREFIX.json beside it)")
    return out


class UnreadableImage(Exception):
    """One input image cannot be used; its row reports why and prediction goes on."""


def _open_image(path: Path) -> Image.Image:
    """Fully decoded; an image over `Image.MAX_IMAGE_PIXELS` is refused from its header, before
    decoding (PIL only warns up to twice that limit: here the warning is an error too)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return img.copy()
    except (*IMAGE_READ_ERRORS, Image.DecompressionBombWarning) as err:
        raise UnreadableImage(f"{type(err).__name__}: {str(err)[:160]}") from None


Item = tuple[str, "Image.Image | None", str]  # (name, image, why it is unusable: "" when usable)


def _shard_images(spec: str) -> Iterator[Item]:
    """(PREFIX#key, image, "") of every sample of a shard set, shard by shard; a sample that
    does not decode, or a damaged shard, gives (name, None, reason)."""
    index, index_file = read_index(spec)
    prefix = spec[:-5] if spec.endswith(".json") else spec
    for url in shard_urls(index, index_file):
        damage: list[str] = []
        for sample in iter_shard(url, lambda _, err: damage.append(f"{type(err).__name__}: {str(err)[:160]}")):
            name = f"{prefix}#{sample.get('__key__')}"
            try:
                check_members(sample, url)
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    yield name, decode_image(sample, None), ""
            except (CorruptSample, DataError, Image.DecompressionBombWarning) as err:
                yield name, None, str(err)[:200]
        for reason in damage:
            yield f"{prefix}#{Path(url).name}", None, f"shard damaged, samples after this point lost ({reason})"


def iter_images(inputs: Iterable[tuple[str, str]]) -> Iterator[Item]:
    """(name, PIL image, "") of every input, in order: files, folder contents (data/layouts.py's
    order), shard samples; (name, None, reason) for one that cannot be read."""
    for kind, spec in inputs:
        if kind == "shards":
            yield from _shard_images(spec)
            continue
        files = [Path(spec)] if kind == "file" else image_files(spec)
        for path in files:
            name = spec if kind == "file" else str(path)
            try:
                yield name, _open_image(path), ""
            except UnreadableImage as err:
                yield name, None, str(err)


# ---------------------------------------------------------------- prediction
def _batches(items: Iterator[Item], transform,
             size: int) -> Iterator[tuple[list[str], torch.Tensor | None, list[tuple[str, str]]]]:
    """(names, images) of up to `size` usable images, with the (name, reason) of unusable ones met on the way."""
    names, tensors, failed = [], [], []
    for name, image, error in items:
        if image is not None:
            try:
                tensors.append(transform(image))
                names.append(name)
            except (OSError, ValueError, RuntimeError, TypeError) as err:  # e.g. a mode the transform cannot take
                failed.append((name, f"{type(err).__name__}: {str(err)[:160]}"))
        else:
            failed.append((name, error))
        if len(names) == size:
            yield names, torch.stack(tensors), failed
            names, tensors, failed = [], [], []
    if names or failed:
        yield names, torch.stack(tensors) if tensors else None, failed


@torch.no_grad()
def predict(run: RestoredRun, paths: Sequence[str], batch_size: int = 256) -> list[dict]:
    """One row per image: path, known class or `unknown`, the primary score, the threshold, the closed-set class."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")
    inputs = check_inputs(paths)
    rows = []
    for names, images, failed in _batches(iter_images(inputs), run.transform, batch_size):
        rows.extend({"path": name, "prediction": ERROR, "score": None, "threshold": run.threshold,
                     "closed_set_class": None, "closed_set_index": None, "error": reason} for name, reason in failed)
        if images is None:
            continue
        out = run.model(images.to(run.device))
        scores = run.scorer(out.features.float(), out.logits.float())
        score = scores[run.score].double().cpu().numpy()
        pred = scores["pred"].cpu().numpy()
        for name, s, k in zip(names, score, pred):
            closed = run.class_names[int(k)]
            rows.append({"path": name, "prediction": closed if s >= run.threshold else UNKNOWN, "score": float(s),
                         "threshold": run.threshold, "closed_set_class": closed, "closed_set_index": int(k),
                         "error": None})
    return rows


# ---------------------------------------------------------------- output
def write_predictions(rows: list[dict], run: RestoredRun, out: str | None) -> None:
    """CSV (or `.json`) to `out`, CSV to stdout without one."""
    if out is not None and Path(out).suffix.lower() not in (".csv", ".json"):
        raise ConfigError(f"--out {out}: write .csv or .json")
    if out is not None and Path(out).suffix.lower() == ".json":
        payload = {"run": str(run.path), "score": run.score, "threshold": run.threshold,
                   "threshold_source": run.threshold_source, "classes": run.class_names, "predictions": rows}
        Path(out).write_text(json.dumps(payload, indent=1))
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    if out is None:
        sys.stdout.write(buffer.getvalue())
    else:
        Path(out).write_text(buffer.getvalue())


def summary_line(rows: list[dict], run: RestoredRun) -> str:
    unknown = sum(r["prediction"] == UNKNOWN for r in rows)
    failed = sum(r["prediction"] == ERROR for r in rows)
    counts = np.unique([r["closed_set_class"] for r in rows if r["prediction"] not in (UNKNOWN, ERROR)],
                       return_counts=True)
    known = ", ".join(f"{c} {n}" for c, n in zip(*counts))
    unreadable = f"; {failed} unreadable (prediction '{ERROR}', reason in the error column)" if failed else ""
    return (f"{len(rows)} images: {unknown} unknown ({run.score} < {run.threshold:.6g}, threshold from "
            f"{run.threshold_source}){'; ' + known if known else ''}{unreadable}")


def main(argv: Sequence[str] | None = None) -> int:

    p = argparse.ArgumentParser(prog="predict.py", description="Known class or 'unknown' per image, from a trained run.")
    p.add_argument("--run", required=True, help="run folder (runs/<run.name>) with config.yaml, checkpoints/best, summary.json")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders of images, or shard prefixes")
    p.add_argument("--out", help="predictions.csv or predictions.json (default: CSV to stdout)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--threshold", type=float, help="score threshold (default: the run's, chosen on validation)")
    args = p.parse_args(argv)
    try:
        check_inputs(args.paths)  # a mistyped path fails before the model is built
        run = restore_run(args.run, args.device, args.threshold)
        rows = predict(run, args.paths, args.batch_size)
        write_predictions(rows, run, args.out)
    except (ConfigError, DataError) as err:
        return report(err)
    sys.stdout.flush()
    print(summary_line(rows, run), file=sys.stderr)
    return 0
