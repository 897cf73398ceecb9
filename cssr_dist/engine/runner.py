"""Assembles a run; does no work of its own.

    Accelerator -> RunData (data, this rank's share) -> model -> Scorer + Evaluator (eval)
      -> Trainer.fit (epochs, best-by-validation) -> final evaluation of the best weights
      -> run folder + W&B

`train(cfg)` is what `accelerate launch train.py` calls on every rank. It resumes from the
run folder's newest complete checkpoint (a requeued Slurm job continues the same run and
the same W&B run); `evaluate_only(cfg)` (`--test`) restores the best checkpoint, score
statistics included, and evaluates it.
"""

from __future__ import annotations

import gc
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from ..config import Config
from ..data.readers import build_run_data
from ..data.splits import resolve_split
from ..errors import ConfigError
from ..eval.evaluator import Evaluator
from ..eval.plots import write_evaluation_plots
from ..eval.report import metrics_table
from ..models.backbones import resolve_backbone_data_config
from ..models.losses import build_loss
from ..models.osr_model import compile_or_eager, resolve_compile_mode
from ..protocol import batch_plan, describe_protocol
from ..tracking import (log_evaluation, log_near_far_table, new_run_id, record_run_end, start_tracking, stop_tracking,
                        wandb_tracker)
from .build import build_model_and_scorer, weights_source
from .checkpoint import Checkpointer, NoUsableCheckpoint, TrainerState, frozen_state_keys
from .distributed import process_group_kwargs
from .optim import build_optimizer
from .preemption import Preempted, PreemptionFlag, mark_preempted
from .run_folder import RunFolder, config_fingerprint, environment_record
from .schedule import build_scheduler
from .trainer import Trainer, best_epoch_line, images_per_s, position


def build_accelerator(cfg: Config, run_dir: Path) -> Accelerator:
    return Accelerator(mixed_precision=cfg.run.mixed_precision, log_with=wandb_tracker(cfg),
                       project_config=ProjectConfiguration(project_dir=str(run_dir)),
                       step_scheduler_with_optimizer=False, kwargs_handlers=process_group_kwargs())


class Run:
    """One experiment on this rank: the assembled components, shared by training and --test."""

    def __init__(self, cfg: Config, test_only: bool = False):
        # null data.mean/std/image_size: the backbone's own (timm), resolved before the fingerprint
        # and config.yaml so that both show the values the run used
        cfg.data = resolve_backbone_data_config(cfg.model, cfg.data)
        self.cfg = cfg
        if cfg.data.split_file:  # a split of another data set is refused before the run folder is touched
            resolve_split(cfg.data)
        self.folder = RunFolder(cfg)
        self.fingerprint = config_fingerprint(cfg)  # of the config as given (before the per-process batch)
        self.accelerator = acc = build_accelerator(cfg, self.folder.path)
        self.environment = environment_record(cfg, acc.num_processes)
        self.start = self.folder.open(acc, cfg, self.fingerprint, self.environment, test_only)
        self.batches = batch_plan(cfg, acc.num_processes)
        cfg.data.batch_size = self.batches.per_process
        acc.print(describe_protocol(cfg))
        acc.print(self.batches.describe(acc.num_processes, cfg))
        set_seed(cfg.run.seed, deterministic=cfg.run.deterministic)
        with acc.main_process_first():
            self.data = build_run_data(cfg.data, cfg.run.seed, acc.process_index, acc.num_processes,
                                       augmented_statistics=cfg.eval.stats_transform == "train", device=acc.device)
        if cfg.model.sync_bn and acc.device.type == "cpu" and acc.num_processes > 1:
            raise ConfigError("model.sync_bn=true needs GPUs (torch has no CPU SyncBatchNorm); drop it for CPU runs")
        self.model, self.scorer = build_model_and_scorer(cfg, self.data.meta.num_classes, acc.device)
        frozen = frozen_state_keys(self.model, buffers_change=cfg.eval.recalibrate_bn)  # stored as a hash only
        if cfg.model.compile:
            self.model = compile_or_eager(self.model, resolve_compile_mode(cfg.model.compile_mode, cfg.data.image_size))
        self.loss_fn = build_loss(cfg.model.head)
        self.evaluator = Evaluator(acc, self.scorer, self.data, cfg.eval, self.loss_fn, self.progress,
                                   self.record_evaluation)
        self.eval_prefix = "test"  # "final" for the evaluation of the selected weights
        self.current_step = lambda: None  # the training step, once training has a state
        self.checkpoints = Checkpointer(acc, self.folder.checkpoints, model=self.model, stats=self.scorer.stats,
                                        keep_last=cfg.run.keep_last, fingerprint=self.fingerprint,
                                        force_resume=cfg.run.force_resume, log=acc.print, frozen_keys=frozen,
                                        weights_source=weights_source(cfg.model))

    def record_evaluation(self, summary: dict, per_set: dict) -> None:
        """Each evaluation, per set: W&B metrics, ROC, histograms, per-class table; PNGs in plots/."""
        if not self.accelerator.is_main_process or self.start == "test":  # --test touches nothing else
            return
        for name, arrays in per_set.items():
            report = summary if name == "test" else summary["ood"][name.split("/", 1)[1]]
            scores = {k: v for k, v in arrays.items() if k not in ("pred", "labels", "ids")}
            prefix = self.eval_prefix if name == "test" else f"{self.eval_prefix}/{name}"
            log_evaluation(self.accelerator, report, scores, arrays["labels"], self.current_step(), prefix)
            write_evaluation_plots(self.folder.path, scores, arrays["labels"], prefix,
                                   report.get("per_unknown_class_auroc"))
        log_near_far_table(self.accelerator, summary, self.current_step(), self.eval_prefix)

    def progress(self, iterable, desc: str, total: int | None = None):
        """A tqdm bar on the local main process only (when run.progress)."""
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                    disable=not (self.cfg.run.progress and self.accelerator.is_local_main_process))

    def restore(self, checkpoints: Checkpointer) -> TrainerState:
        """The newest usable checkpoint's state, or a fresh one. When a trained run has none
        usable: `NoUsableCheckpoint` (one line, nothing changed), unless `run.force_restart`,
        which sets the old run aside and starts over."""
        try:
            return checkpoints.restore() or TrainerState()
        except NoUsableCheckpoint as err:
            if self.accelerator.is_main_process:  # this start resumes nothing: no record of it
                self.folder.withdraw_resume_record()
            if not self.cfg.run.force_restart:
                raise
            self.accelerator.print(f"run.force_restart: {err}")
            if self.accelerator.is_main_process:
                self.folder.set_aside_previous()
                self.folder.write_start_records(self.cfg, self.environment, "restart")
            self.accelerator.wait_for_everyone()
            return TrainerState()

    def save_best(self, state: TrainerState, posthoc_sample: bool = False) -> None:
        """best/: the selected weights with their score statistics and fingerprint, in safetensors,
        labelled with the epoch they were selected at; `posthoc_sample` (after the final
        evaluation, whose fit used these weights): with the post-hoc detectors' training sample."""
        self.checkpoints.save_best(epoch=state.best_epoch, best_value=state.best_value, score=self.scorer.primary,
                                   posthoc=self.scorer.detectors.sample_tensors() if posthoc_sample else None)

    def load_best(self, posthoc_sample: bool = False) -> dict:
        """`posthoc_sample`: a stored post-hoc sample that fits the config is kept for the
        evaluation's detector fit (`--test`: no pass over the training images)."""
        return self.checkpoints.load_best(posthoc=self.scorer.detectors.restore_sample if posthoc_sample else None)

    def report(self, summary: dict, file: str = "summary.json") -> None:
        """summary file + metrics table in the run folder, the table on rank 0 (W&B: record_evaluation)."""
        if self.accelerator.is_main_process:
            self.folder.write_summary(summary, file)
            if file == "summary.json":  # --test writes its own summary and touches nothing else
                self.folder.write_table(metrics_table(summary, self.cfg.run.name))
        self.accelerator.print(metrics_table(summary, self.cfg.run.name))

    def close(self) -> None:
        """Orderly teardown: avoids gloo's abort-at-exit seen on CPU runs."""
        acc = self.accelerator
        acc.wait_for_everyone()
        acc.end_training()
        self.data.close()
        self.model = self.scorer = self.evaluator = self.data = None
        acc.free_memory()
        gc.collect()


def train(cfg: Config) -> dict:
    """Train (resuming if possible), select by validation, evaluate the best weights, record."""
    preemption = PreemptionFlag()  # from the start: a signal during set-up ends in a checkpoint too
    run = Run(cfg)
    acc = run.accelerator
    optimizer = build_optimizer(run.model.parameters(), cfg.optim, run.batches.global_batch)
    run.model, optimizer = acc.prepare(run.model, optimizer)
    scheduler = build_scheduler(optimizer, cfg.schedule, len(run.data.train))
    checkpoints = run.checkpoints.for_training(run.model, optimizer, scheduler,
                                               (cfg.schedule.epochs, len(run.data.train)))

    state = run.restore(checkpoints)
    if checkpoints.restored_from is not None:
        acc.print(f"resuming {cfg.run.name} from {checkpoints.restored_from.name} (step {state.global_step}: "
                  f"{position(state, cfg.schedule.epochs, len(run.data.train))})")
        if acc.is_main_process:  # rows written after this checkpoint (before a kill) would appear twice
            run.folder.rewrite_history(state.history)
    if state.finished:
        acc.print(f"run {cfg.run.name} already finished; evaluating its best checkpoint")
    state.wandb_run_id = state.wandb_run_id or new_run_id()
    start_tracking(acc, cfg, run.folder.path, state.wandb_run_id)

    save = lambda: checkpoints.save(state)  # noqa: E731
    trainer = Trainer(cfg, acc, run.model, optimizer, scheduler, run.loss_fn, state, preemption, save,
                      run.scorer.classify)
    run.current_step = lambda: state.global_step  # evaluations are logged at the training step
    record = lambda row: run.folder.append_history(row) if acc.is_main_process else None  # noqa: E731
    try:
        trainer.fit(run.data.train, run.evaluator, lambda: run.save_best(state), record, run.progress)
        if preemption.should_stop(acc):  # signalled during the last epoch's evaluation or checkpoint
            acc.print(f"preempted before the final evaluation; checkpoint at step {state.global_step} is complete")
            raise Preempted()
    except Preempted:
        mark_preempted()  # the checkpoint is complete: tell the launcher before W&B's flush (it may be slow online)
        stop_tracking(acc)  # flush this attempt's W&B rows; a dead W&B service costs one line, not the exit code
        raise
    selection = best_epoch_line(state.history, cfg.eval.select_best_by, state.best_epoch)
    acc.print(selection)
    if (run.folder.checkpoints / "best" / "weights.safetensors").is_file():
        run.load_best()
    run.eval_prefix = "final"
    summary = run.evaluator.evaluate(run.model)
    summary.update({"run": cfg.run.name, "epochs": state.epoch, "best_epoch": state.best_epoch,
                    "selected_by": cfg.eval.select_best_by, "best_selection": selection,
                    "train_time_s": round(state.train_time_s, 1), "images_per_s": images_per_s(state.history),
                    "world_size": acc.num_processes, "counts": run.data.meta.counts,
                    "class_names": run.data.meta.class_names})
    # the selected weights now with the statistics (and, if kept, the detectors' sample) fitted for them
    run.save_best(state, posthoc_sample=cfg.eval.posthoc_keep_sample)
    run.report(summary)
    record_run_end(acc, summary, run.folder.checkpoints / "best")  # W&B: run summary, best/ as model artifact
    run.close()
    return summary


def evaluate_only(cfg: Config) -> dict:
    """`--test`: restore the best checkpoint (weights + statistics) and evaluate it."""
    run = Run(cfg, test_only=True)
    meta = run.load_best(posthoc_sample=True)
    run.model = run.accelerator.prepare(run.model)
    run.eval_prefix = "restored"
    summary = run.evaluator.evaluate(run.model, fit=False)
    summary.update({"run": cfg.run.name, "restored_from": str(run.folder.checkpoints / "best"),
                    "checkpoint_epoch": meta.get("epoch"), "world_size": run.accelerator.num_processes,
                    "config_as_trained": meta.get("fingerprint") in (None, run.fingerprint)})
    run.report(summary, "summary_test.json")
    run.close()
    return summary
