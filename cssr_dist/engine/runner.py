"""Assembles a run: Accelerator, data, model, optimizer, trainer, evaluation, records.

`run(cfg)` is what `accelerate launch train.py` ends up calling on every rank. It resumes
automatically from the run folder's newest complete checkpoint (so a requeued Slurm job
continues the same run and the same W&B run), and `test_only` restores the best
checkpoint, score statistics included, and evaluates it.
"""

from __future__ import annotations

import gc
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import Config
from ..data.loaders import build_data, build_datasets
from ..errors import ConfigError, DataError
from ..eval import evaluator as E
from ..eval.report import metrics_table
from ..models.losses import build_loss
from ..models.osr_model import build_model
from ..scoring.scores import predict as predict_classes
from ..scoring.statistics import ScoreStatistics
from ..tracking import RunFolder, environment_record, new_run_id, wandb_available, wandb_init_kwargs
from .checkpoint import TrainerState, latest_checkpoint, load_checkpoint, load_weights, save_checkpoint, save_weights
from .distributed import WORKER_TIMEOUT_S, SeededSamples, eval_loader, eval_module, process_group_kwargs, set_epoch
from .optim import build_optimizer
from .preemption import Preempted, PreemptionFlag
from .schedule import build_scheduler
from .trainer import Trainer


@dataclass
class EvalData:
    """Evaluation iterables for this rank, plus what metrics need to name classes."""

    val: object
    train_eval: object
    test: object
    ood: dict
    test_original_of: object | None  # ids -> original labels (per-unknown-class AUROC)
    original_class_names: list[str]


def build_accelerator(cfg: Config, run_dir: Path) -> Accelerator:
    trackers = "wandb" if cfg.tracking.wandb and wandb_available() else None
    return Accelerator(
        mixed_precision=cfg.run.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(run_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=process_group_kwargs(),
    )


def _progress(accelerator: Accelerator, cfg: Config, desc: str, iterable=None, total: int | None = None):
    """A tqdm bar shown on the local main process only (when run.progress)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=not (cfg.run.progress and accelerator.is_local_main_process))


def _wrap(accelerator, cfg, desc):
    """A progress wrapper for evaluation loops (rank 0 only)."""
    return lambda iterable: _progress(accelerator, cfg, desc, iterable)


def _native_eval_data(cfg: Config, bundle, accelerator) -> EvalData:
    rank, world = accelerator.process_index, accelerator.num_processes
    make = lambda ds: eval_loader(ds, cfg.data.eval_batch_size, cfg.data.num_workers, rank, world)  # noqa: E731
    return EvalData(
        val=make(bundle.val) if bundle.val is not None and len(bundle.val) else None,
        train_eval=make(bundle.train_eval),
        test=make(bundle.test),
        ood={name: make(ds) for name, ds in bundle.ood.items()},
        test_original_of=getattr(bundle.test, "original_labels_of", None),
        original_class_names=list(getattr(bundle, "original_class_names", []) or []),
    )


def _shard_eval_data(loaders: dict) -> EvalData:
    """Shard loaders are split by rank and worker already (and never go through prepare)."""
    meta = loaders["metadata"]
    original = meta.get("test_original_labels")
    return EvalData(
        val=loaders["val"], train_eval=loaders["train_eval"], test=loaders["test"], ood=loaders["ood"],
        test_original_of=(lambda ids: original[ids]) if original is not None else None,
        original_class_names=list(meta.get("original_class_names", [])),
    )


def _train_loader(cfg: Config, bundle) -> DataLoader:
    if len(bundle.train) < cfg.data.batch_size:
        raise DataError(f"training set has {len(bundle.train)} samples, fewer than data.batch_size="
                        f"{cfg.data.batch_size}; lower the batch size or enlarge data.train_per_class")
    return DataLoader(SeededSamples(bundle.train, cfg.run.seed), batch_size=cfg.data.batch_size, shuffle=True,
                      drop_last=True, num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                      timeout=WORKER_TIMEOUT_S if cfg.data.num_workers > 0 else 0)


def compile_or_eager(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with a silent fallback to eager where a graph fails (e.g. no compiler)."""
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
        return torch.compile(model)
    except Exception as err:  # noqa: BLE001 - any backend failure means: run eagerly
        print(f"warning: torch.compile unavailable ({type(err).__name__}); running eagerly")
        return model


def _feature_channels(model, cfg: Config, device) -> int:
    model.eval()
    with torch.no_grad():
        dummy = torch.zeros(1, cfg.data.in_chans, cfg.data.image_size, cfg.data.image_size, device=device)
        return int(model(dummy).features.shape[1])


class Run:
    """One experiment on this rank: holds the assembled components between phases."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.folder = RunFolder(cfg)
        self.accelerator = build_accelerator(cfg, self.folder.path)
        acc = self.accelerator
        set_seed(cfg.run.seed, deterministic=cfg.run.deterministic)
        if acc.is_main_process:
            self.folder.create()
            self.folder.write_config(cfg)
            self.folder.write_environment(environment_record(cfg, acc.num_processes))
        acc.wait_for_everyone()
        self.shards = cfg.data.format == "shards"
        with acc.main_process_first():
            if self.shards:
                self.shard_loaders = build_data(cfg.data, cfg.run.seed)
                self.num_classes = self.shard_loaders["metadata"]["num_classes"]
            else:
                self.bundle = build_datasets(cfg.data, cfg.run.seed)
                self.num_classes = self.bundle.num_classes
        if cfg.model.sync_bn and acc.device.type == "cpu" and acc.num_processes > 1:
            raise ConfigError("model.sync_bn=true needs GPUs (torch has no CPU SyncBatchNorm); drop it for CPU runs")
        self.model = build_model(cfg.model, self.num_classes, cfg.data.in_chans).to(acc.device)
        if cfg.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        channels = _feature_channels(self.model, cfg, acc.device)
        if cfg.model.compile:
            self.model = compile_or_eager(self.model)
        self.score = E.primary_score(cfg.model.head, cfg.run.method, cfg.eval.score)
        self.stats = ScoreStatistics(self.num_classes, channels, use_gram=E.needs_statistics(self.score)).to(acc.device)
        self.loss_fn = build_loss(cfg.model.head)
        self.eval_data = self._eval_data()

    # ------------------------------------------------------------------ data
    def _eval_data(self) -> EvalData:
        if self.shards:
            return _shard_eval_data(self.shard_loaders)
        return _native_eval_data(self.cfg, self.bundle, self.accelerator)

    def train_loader(self):
        """Native loaders are sharded by `accelerator.prepare`; shard loaders by themselves."""
        if self.shards:
            return self.shard_loaders["train"]
        return _train_loader(self.cfg, self.bundle)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, fit_stats: bool = True) -> dict:
        acc, cfg, model = self.accelerator, self.cfg, eval_module(self.accelerator, self.model)
        data = self.eval_data
        if fit_stats and E.needs_statistics(self.score):
            E.fit_statistics(model, data.train_eval, self.stats, cfg.model.head, acc, _wrap(acc, cfg, "statistics"))
        stats = self.stats if E.needs_statistics(self.score) else None
        pred = lambda loader, desc: E.predict(model, loader, stats, cfg.model.head, acc, _wrap(acc, cfg, desc))  # noqa: E731
        val = pred(data.val, "val") if data.val is not None else {}
        test = pred(data.test, "test")
        baselines = [b for b in cfg.eval.baselines if b != self.score]
        summary = E.score_report(test, val, self.score, baselines, self.num_classes, cfg.eval.tpr)
        if data.test_original_of is not None and (test["labels"] < 0).any():
            summary["per_unknown_class_auroc"] = E.per_unknown_class_auroc(
                test, self.score, data.test_original_of(test["ids"]), data.original_class_names)
        if data.ood:
            summary["ood"] = {}
            for name, loader in data.ood.items():
                joined = E.join_known_and_ood(test, pred(loader, f"ood:{name}"))
                summary["ood"][name] = E.score_report(joined, val, self.score, baselines, self.num_classes, cfg.eval.tpr)
        summary["num_test_known"] = int((test["labels"] >= 0).sum())
        summary["num_test_unknown"] = int((test["labels"] < 0).sum())
        return summary

    @torch.no_grad()
    def validate(self) -> dict:
        """Accuracy and loss on the validation slice of known classes (model selection)."""
        if self.eval_data.val is None:
            return {}
        acc, model = self.accelerator, eval_module(self.accelerator, self.model)
        model.eval()
        correct = torch.zeros((), device=acc.device)
        loss_sum = torch.zeros((), device=acc.device)
        count = torch.zeros((), device=acc.device)
        for images, labels, _ in self.eval_data.val:
            images, labels = images.to(acc.device), labels.to(acc.device)
            with acc.autocast():
                out = model(images)
            logits = out.logits.float()
            loss_sum += self.loss_fn(logits, labels) * labels.numel()
            pred = predict_classes(self.cfg.model.head, logits)
            correct += (pred == labels).sum()
            count += labels.numel()
        totals = acc.reduce(torch.stack([correct, loss_sum, count]), reduction="sum").tolist()
        return {"val_acc": totals[0] / max(1.0, totals[2]), "val_loss": totals[1] / max(1.0, totals[2])}

    # ------------------------------------------------------------------ weights
    def _weights(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"stats.{k}": v for k, v in self.stats.state_dict().items()})
        return tensors

    def _load_weights(self, path: Path) -> dict:
        tensors, meta = load_weights(path)
        model = self.accelerator.unwrap_model(self.model)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.stats.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("stats.")})
        return meta

    def save_best(self, state: TrainerState, name: str = "best") -> None:
        if self.accelerator.is_main_process:
            save_weights(self.folder.checkpoints / name, self._weights(),
                         {"epoch": state.epoch, "best_value": state.best_value, "score": self.score})
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ records
    def finish(self, summary: dict) -> None:
        if self.accelerator.is_main_process:
            self.folder.write_summary(summary)
            self.folder.write_table(metrics_table(summary, self.cfg.run.name))
        flat = {f"final/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
        self.accelerator.log(flat)

    def close(self) -> None:
        """Orderly teardown: avoids gloo's abort-at-exit seen on CPU runs."""
        acc = self.accelerator
        acc.wait_for_everyone()
        acc.end_training()
        for loader in (getattr(self, "shard_loaders", None) or {}).values():
            if hasattr(loader, "close"):
                loader.close()
        self.model = self.stats = self.eval_data = self.bundle = self.shard_loaders = None
        acc.free_memory()
        gc.collect()


def _resume_position(acc, loader, skip: int):
    """Continue mid-epoch: the epoch's order is seeded, so skipping reproduces the position."""
    if not skip:
        return loader
    if getattr(loader, "sharded", False):
        return itertools.islice(iter(loader), skip, None)
    return acc.skip_first_batches(loader, skip)


def _improved(metric: str, value: float | None, best: float | None) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best if metric == "val_loss" else value > best


def train(cfg: Config) -> dict:
    """Train (resuming if possible), select by validation, evaluate, write the run folder."""
    run = Run(cfg)
    acc = run.accelerator
    train_loader = run.train_loader()
    global_batch = cfg.data.batch_size * acc.num_processes
    optimizer = build_optimizer(run.model.parameters(), cfg.optim, global_batch)
    if run.shards:
        model, optimizer = acc.prepare(run.model, optimizer)
    else:
        model, optimizer, train_loader = acc.prepare(run.model, optimizer, train_loader)
    run.model = model
    scheduler = build_scheduler(optimizer, cfg.schedule, len(train_loader))
    acc.register_for_checkpointing(scheduler, run.stats)

    state = TrainerState()
    ckpt = latest_checkpoint(run.folder.checkpoints)
    if ckpt is not None:
        state = load_checkpoint(acc, ckpt)
        acc.print(f"resuming {cfg.run.name} from {ckpt.name} (epoch {state.epoch}, step {state.global_step})")
    if state.finished:
        acc.print(f"run {cfg.run.name} already finished; evaluating its best checkpoint")
    state.wandb_run_id = state.wandb_run_id or new_run_id()
    acc.init_trackers(cfg.tracking.project, config=_flat_config(cfg),
                      init_kwargs={"wandb": wandb_init_kwargs(cfg, run.folder.path, state.wandb_run_id)})

    preemption = PreemptionFlag()
    save = lambda: save_checkpoint(acc, run.folder.checkpoints, state, cfg.run.keep_last)  # noqa: E731
    trainer = Trainer(cfg, acc, model, optimizer, scheduler, run.loss_fn, state, preemption, save)
    start = time.time()
    while state.epoch < cfg.schedule.epochs and not state.finished:
        set_epoch(train_loader, state.epoch)
        batches = _resume_position(acc, train_loader, state.step_in_epoch)
        bar = _progress(acc, cfg, f"epoch {state.epoch + 1}/{cfg.schedule.epochs}", total=len(train_loader))
        bar.update(state.step_in_epoch)
        result = trainer.train_epoch(batches, bar)
        bar.close()
        if result.stop == "preempted":
            save()
            acc.print(f"preempted at step {state.global_step}; checkpoint written, exiting for requeue")
            raise Preempted()
        epoch_done = state.step_in_epoch >= len(train_loader)
        if epoch_done:
            state.epoch += 1
            state.step_in_epoch = 0
        row = {"epoch": state.epoch, "step": state.global_step, "train_loss": result.mean_loss,
               "lr": scheduler.get_last_lr()[0], "time_s": round(time.time() - start, 2), **run.validate()}
        interval = cfg.eval.test_interval
        last = state.epoch >= cfg.schedule.epochs or result.stop == "max_steps"
        if interval and epoch_done and state.epoch % interval == 0 and not last:
            row["test"] = _compact(run.evaluate())
        key = cfg.eval.select_best_by
        if key == "last" or _improved(key, row.get(key), state.best_value):
            state.best_value = row.get(key)
            state.best_epoch = state.epoch
            run.save_best(state)
        state.history.append(row)
        if acc.is_main_process:
            run.folder.append_history(row)
        acc.log({f"epoch/{k}": v for k, v in row.items() if isinstance(v, (int, float))}, step=state.global_step)
        acc.print(_epoch_line(row))
        if last:
            state.finished = True
        save()
    summary = _final_evaluation(run, state, time.time() - start)
    run.close()
    return summary


def _final_evaluation(run: Run, state: TrainerState, train_time: float) -> dict:
    """Evaluate the selected (best-by-validation) weights and store them with their statistics."""
    best = run.folder.checkpoints / "best"
    if (best / "weights.safetensors").is_file():
        run._load_weights(best)
    t0 = time.time()
    summary = run.evaluate()
    summary.update({"run": run.cfg.run.name, "epochs": state.epoch, "best_epoch": state.best_epoch,
                    "selected_by": run.cfg.eval.select_best_by, "train_time_s": round(train_time, 1),
                    "eval_time_s": round(time.time() - t0, 1), "world_size": run.accelerator.num_processes})
    run.save_best(state)
    run.finish(summary)
    run.accelerator.print(metrics_table(summary, run.cfg.run.name))
    return summary


def evaluate_only(cfg: Config) -> dict:
    """`--test`: restore the best checkpoint (weights + statistics) and evaluate it."""
    run = Run(cfg)
    best = run.folder.checkpoints / "best"
    meta = run._load_weights(best)
    run.model = run.accelerator.prepare(run.model)
    summary = run.evaluate(fit_stats=False)
    summary.update({"run": cfg.run.name, "restored_from": str(best), "checkpoint_epoch": meta.get("epoch"),
                    "world_size": run.accelerator.num_processes})
    if run.accelerator.is_main_process:
        run.folder.write_summary(summary, "summary_test.json")
    run.accelerator.print(metrics_table(summary, cfg.run.name))
    run.close()
    return summary


def _compact(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if isinstance(v, (int, float))}


def _epoch_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {row['train_loss']:.4f}"]
    if "val_acc" in row:
        parts.append(f"val_acc {row['val_acc']:.4f}")
    test = row.get("test") or {}
    for key in ("closed_acc", "auroc", "oscr"):
        if key in test:
            parts.append(f"{key} {test[key]:.4f}")
    return " | ".join(parts)


def _flat_config(cfg: Config) -> dict:
    from ..tracking import flatten
    from ..config import to_dict

    return {k: (str(v) if isinstance(v, list) else v) for k, v in flatten("", to_dict(cfg)).items()}
