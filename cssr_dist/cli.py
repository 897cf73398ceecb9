"""Command line of train.py: our dotted overrides plus the reference code's flags.

Users of the reference keep their muscle memory (`--ds exps/cifar10/spl_a.json --method
cssr --save run1 --configupdate a:1,b:2`); each flag maps onto the one config schema.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import Config, apply_override, build_config, dump_yaml, load_yaml_tree, parse_override
from .errors import (STORAGE_ERRNOS, USER_ERROR_EXIT, ConfigError, CssrError, FailedOnAnotherRank, report,
                     storage_error)
from .stacks import print_stacks_on_signal

GPU_NOTE = ("note: --gpu is ignored: Accelerate chooses devices (use `accelerate launch --gpu_ids 0,1` "
            "or CUDA_VISIBLE_DEVICES)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train / evaluate CSSR open-set recognition models (run with `python launchers/launch.py "
                    "[accelerate launch options] train.py ...`).",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. schedule.epochs=5")
    p.add_argument("--config", help="YAML config (may `inherit` others); default: built-in Fashion-MNIST RCSSR")
    p.add_argument("--ds", help="reference-format split file (exps/<dataset>/spl_<s>.json); without --config it "
                   "selects configs/<dataset>/<model.head, default rcssr>.yaml")
    p.add_argument("--save", help="run name: results go to <run.output_dir>/<name>/")
    p.add_argument("--method", choices=["cssr", "cssr_ft"], help="cssr: from scratch; cssr_ft: fine-tune a frozen pretrained backbone")
    p.add_argument("--test", action="store_true", help="restore the run's best checkpoint and evaluate it")
    p.add_argument("--configupdate", help="reference-style overrides a.b:v,c:w")
    p.add_argument("--test_interval", type=int, help="evaluate on the test set every N epochs (0: only at the end)")
    p.add_argument("--gpu", help=argparse.SUPPRESS)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


DEFAULT_CONFIG = "configs/fashion_mnist/rcssr.yaml"


def config_for_split_file(split_file: str, head: str, configs_dir: Path) -> Path:
    """`exps/<dataset>/spl_a.json` -> configs/<dataset>/<head>.yaml: a reference user who gives
    only --ds must get that data set's recipe, not the Fashion-MNIST defaults."""
    dataset = Path(split_file).parent.name
    path = configs_dir / dataset / f"{head}.yaml"
    if not path.is_file():
        raise ConfigError(f"--ds {split_file} without --config: no config {path} for data set '{dataset}' and "
                          f"model.head '{head}'; pass --config configs/<dataset>/<method>.yaml")
    return path


def _head_override(args: argparse.Namespace) -> str:
    """model.head from the overrides or --configupdate (last wins), else rcssr."""
    head = "rcssr"
    items = [parse_override(i, sep=":") for i in (args.configupdate or "").split(",") if i]
    items += [parse_override(i) for i in args.overrides]
    for key, value in items:
        if key == "model.head":
            head = str(value)
    return head


def config_from_args(args: argparse.Namespace) -> Config:
    """Merge YAML, reference flags and overrides (later wins) into a validated Config."""
    path = args.config
    if path is None and args.ds:
        path = str(config_for_split_file(args.ds, _head_override(args), Path(__file__).resolve().parent.parent / "configs"))
        print(f"note: --ds without --config: using {Path(path).relative_to(Path(path).parents[2])}", file=sys.stderr)
    if path is None:
        default = Path(__file__).resolve().parent.parent / DEFAULT_CONFIG
        path = str(default) if default.is_file() else None
    tree = load_yaml_tree(path) if path else {}
    flags: list[tuple[str, object]] = []
    if args.ds:
        flags.append(("data.split_file", args.ds))
    if args.save is not None:  # `--save ""` is refused by the name check, not ignored
        flags.append(("run.name", args.save))
    if args.method:
        flags.append(("run.method", args.method))
    if args.test_interval is not None:
        flags.append(("eval.test_interval", args.test_interval))
    if args.configupdate:
        flags += [parse_override(item, sep=":") for item in args.configupdate.split(",") if item]
    flags += [parse_override(item) for item in args.overrides]
    for key, value in flags:
        apply_override(tree, key, value)
    if args.method == "cssr_ft" and "freeze_backbone" not in tree.get("model", {}):
        apply_override(tree, "model.freeze_backbone", True)
    where = f"(in {path} or command-line overrides)" if path else "(in command-line overrides)"
    return build_config(tree, where)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_intermixed_args(argv)  # overrides before and after flags (--test a=1)
    if args.gpu is not None:
        print(GPU_NOTE, file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> int:
    print_stacks_on_signal()
    args = parse(argv)
    try:
        cfg = config_from_args(args)
        if args.print_config:
            if cfg.data.mean is None or cfg.data.image_size is None:  # "the backbone's own", as a run resolves it
                # start-up time: timm and torch only when the config leaves these to the backbone
                from .models.backbones import resolve_backbone_data_config

                cfg.data = resolve_backbone_data_config(cfg.model, cfg.data)
            print(dump_yaml(cfg), end="")
            return 0
        # start-up time: --help and --print-config answer without importing torch and the engine
        from .engine.preemption import REQUEUE_EXIT_CODE, Preempted
        from .engine.runner import evaluate_only, train

        try:
            evaluate_only(cfg) if args.test else train(cfg)
        except Preempted:  # the checkpoint is written and the launcher's marker left (runner.train)
            return REQUEUE_EXIT_CODE
    except CssrError as err:
        return report_once(err)
    except OSError as err:  # any other write the storage refused (history, summary, plots): one line too
        if err.errno in STORAGE_ERRNOS:
            folder = Path(err.filename).parent if err.filename else Path(".")
            return report_once(storage_error(err, Path(err.filename or '?').name, folder))
        return quiet_after_a_peer_error(err)
    except Exception as err:  # noqa: BLE001 - re-raised unless another rank's user error caused it
        return quiet_after_a_peer_error(err)
    return 0


def _multi_process() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


#: how long a rank whose write failed elsewhere waits for that rank's own line before printing its own
PEER_LINE_WAIT_S = 10.0


def report_once(err: BaseException) -> int:
    """The one `error:` line of the whole job: in a multi-process run only the first rank to
    fail prints it (`distributed.claim_first_error`); the others exit with the same status, quietly.
    An error that only echoes another rank's (`FailedOnAnotherRank`) waits for that rank's line."""
    if _multi_process():
        # start-up time: torch only on a multi-process error path
        from .distributed import claim_first_error, peer_failed_first

        if isinstance(err, FailedOnAnotherRank) and peer_failed_first(PEER_LINE_WAIT_S):
            return USER_ERROR_EXIT
        if not claim_first_error():
            return USER_ERROR_EXIT
    return report(err)


def quiet_after_a_peer_error(err: Exception) -> int:
    """A rank whose collective broke because another rank stopped with a user error exits
    with that status and no traceback: the user reads the first rank's line, alone. Any other
    exception is a real failure and is re-raised (its traceback is the report)."""
    if _multi_process():
        from .distributed import peer_failed_first  # start-up time: torch only on a multi-process error path

        if peer_failed_first():
            return USER_ERROR_EXIT
    raise err
