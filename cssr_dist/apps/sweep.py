"""Sweeps: data sets x splits x methods x seeds -> one run folder each, run locally one after
another or submitted to Slurm: the array `slurm/osr_sweep.sh` (one task per run, small data
sets), or one multi-node job of `slurm/imagenet_rcssr.sh` per run for ImageNet configs
(`data.dataset: imagenet`), with the cluster's partition, account, nodes, GPUs per node and
time limit (:class:`SlurmResources`). Before anything is submitted, every unfinished run is
pre-flighted (`engine/preflight.py`: shard indexes, weights, output folders); the job runs the
same check again on its batch host before `srun` starts the nodes.

A run is identified by its folder `<output_dir>/<name>`, name `{dataset}_{method}_{split}_s{seed}`
(prefixed by `<tag>_` when a tag is given). Its state comes from the folder alone, so a sweep
can be re-run at any time: `summary.json` present -> finished, skipped; a folder without it
-> interrupted, relaunched (the runner resumes from its last checkpoint); no folder -> new.
The grid order (data set, split, method, seed) is the one `osr_sweep.sh --list` prints, so
a Slurm array index means the same run in both.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..cli import config_from_args, parse
from ..config import Config
from ..engine.preflight import preflight
from ..errors import ConfigError, CssrError, check_plain_name, report

#: The checkout this package runs from (an editable install): configs/, slurm/ and train.py live there.
REPO_ROOT = Path(__file__).resolve().parents[2]

__all__ = ["DEFAULT_SPLITS", "RunSpec", "SlurmResources", "expand", "run_state", "train_command", "run_local",
           "slurm_submission", "multinode_submissions", "is_multinode", "preflight_specs", "format_duration"]

ARRAY_SCRIPT = "slurm/osr_sweep.sh"
MULTINODE_SCRIPT = "slurm/imagenet_rcssr.sh"
MULTINODE_DATASETS = ("imagenet",)  # data.dataset values whose runs go to MULTINODE_SCRIPT
#: Slurm's --time formats: minutes, m:s, h:m:s, d-h, d-h:m, d-h:m:s
SLURM_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}")

#: Each data set's own split family (as osr_sweep.sh): CSSR a-e, ARPL 0-4, built-in "default".
DEFAULT_SPLITS: dict[str, tuple[str, ...]] = {
    "cifar10": ("a", "b", "c", "d", "e"),
    "svhn": ("a", "b", "c", "d", "e"),
    "tinyimagenet": ("a", "b", "c", "d", "e"),
    "cifar_plus10": ("0", "1", "2", "3", "4"),
    "cifar_plus50": ("0", "1", "2", "3", "4"),
    "mnist": ("0", "1", "2", "3", "4"),
    "fashion_mnist": ("0", "1", "2", "3", "4"),
    "imagenet": ("default",),  # split_family none: all 1000 classes known, unknowns from the OOD sets
}

FINISHED, INTERRUPTED, NEW = "finished", "interrupted", "new"


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    method: str
    split: str
    seed: int = 0
    tag: str = ""

    @property
    def name(self) -> str:
        return f"{self.tag + '_' if self.tag else ''}{self.dataset}_{self.method}_{self.split}_s{self.seed}"

    @property
    def config(self) -> str:
        return f"configs/{self.dataset}/{self.method}.yaml"

    def overrides(self, output_dir: str | Path) -> list[str]:
        return [f"data.split={self.split}", f"run.seed={self.seed}", f"run.name={self.name}",
                f"run.output_dir={output_dir}"]


@dataclass(frozen=True)
class SlurmResources:
    """What a sweep asks Slurm for; None leaves the script's own #SBATCH default."""

    partition: str | None = None
    account: str | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    time: str | None = None
    cpus_per_task: int | None = None  # per node (one launcher task per node): loader workers + the processes

    def check(self) -> "SlurmResources":
        for what, name in (("--partition", self.partition), ("--account", self.account)):
            if name is not None:
                check_plain_name(name, what)
        if self.nodes is not None and self.nodes < 1:
            raise ConfigError(f"--nodes {self.nodes}: a job needs at least 1 node")
        if self.gpus_per_node is not None and self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node {self.gpus_per_node}: give 0 or more")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ConfigError(f"--cpus-per-task {self.cpus_per_task}: give 1 or more")
        if self.time is not None and not SLURM_TIME.fullmatch(self.time):
            raise ConfigError(f"--time {self.time!r} is not a Slurm time limit; use minutes, HH:MM:SS or D-HH:MM:SS")
        return self

    def sbatch_options(self) -> list[str]:
        """`--partition=.. --account=.. --nodes=.. --gpus-per-node=.. --cpus-per-task=.. --time=..` (those given)."""
        values = (("partition", self.partition), ("account", self.account), ("nodes", self.nodes),
                  ("gpus-per-node", self.gpus_per_node), ("cpus-per-task", self.cpus_per_task), ("time", self.time))
        return [f"--{key}={value}" for key, value in values if value is not None]


def expand(datasets: Sequence[str], methods: Sequence[str], splits: Sequence[str] | None = None,
           seeds: Sequence[int] = (0,), tag: str = "", configs_dir: str | Path = "configs") -> list[RunSpec]:
    """The grid, data set -> split -> method -> seed (osr_sweep.sh's order). `splits=None`:
    each data set's own (:data:`DEFAULT_SPLITS`). A missing config is an error before any run."""
    for what, names in (("--datasets", datasets), ("--methods", methods), ("--splits", splits or ()),
                        ("--tag", [tag] if tag else [])):
        for name in names:  # each becomes part of a run folder name or a config path
            check_plain_name(str(name), what)
    for ds in datasets:
        if splits is None and ds not in DEFAULT_SPLITS:
            raise ConfigError(f"no default splits for data set '{ds}'; pass --splits (known: {', '.join(DEFAULT_SPLITS)})")
        for method in methods:
            if not (Path(configs_dir) / ds / f"{method}.yaml").is_file():
                raise ConfigError(f"no config {configs_dir}/{ds}/{method}.yaml for the sweep; check --datasets/--methods")
    return _grid(datasets, methods, splits, seeds, tag)


def _grid(datasets: Sequence[str], methods: Sequence[str], splits: Sequence[str] | None, seeds: Sequence[int],
          tag: str) -> list[RunSpec]:
    return [RunSpec(ds, method, str(split), int(seed), tag)
            for ds in datasets for split in (splits if splits is not None else DEFAULT_SPLITS.get(ds, ()))
            for method in methods for seed in seeds]


def run_state(output_dir: str | Path, spec: RunSpec) -> str:
    """finished (summary.json written at the end of a run) | interrupted (folder, no summary) | new."""
    folder = Path(output_dir) / spec.name
    if (folder / "summary.json").is_file():
        return FINISHED
    return INTERRUPTED if folder.is_dir() else NEW


def train_command(spec: RunSpec, launcher: Sequence[str], output_dir: str | Path,
                  overrides: Sequence[str] = ()) -> list[str]:
    """`<launcher> train.py --config configs/<ds>/<method>.yaml data.split=.. run.seed=.. run.name=.. <overrides>`."""
    return [*launcher, "train.py", "--config", spec.config, *spec.overrides(output_dir), *overrides]


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_local(specs: Sequence[RunSpec], launcher: Sequence[str], output_dir: str | Path,
              overrides: Sequence[str] = (), *, cwd: str | Path = ".", dry_run: bool = False,
              run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
              clock: Callable[[], float] = time.monotonic, log: Callable[[str], None] = print) -> dict[str, str]:
    """Run every unfinished spec one after another; one progress line per run.

    Returns {run name: finished | skipped | failed (exit N) | dry-run}. A failed run does not
    stop the sweep (the next sweep relaunches it, resuming from its checkpoints). ETA =
    mean wall time of the runs launched so far x runs still to launch.
    """
    outcome: dict[str, str] = {}
    todo = [s for s in specs if run_state(output_dir, s) != FINISHED]
    start, launched, total = clock(), 0, len(specs)
    for i, spec in enumerate(specs, 1):
        state = run_state(output_dir, spec)
        prefix = f"[{i}/{total}] {spec.name}"
        if state == FINISHED:
            outcome[spec.name] = "skipped"
            log(f"{prefix}: finished, skipped")
            continue
        cmd = train_command(spec, launcher, output_dir, overrides)
        if dry_run:
            outcome[spec.name] = "dry-run"
            log(f"{prefix}: {state}; would run: {shlex.join(cmd)}")
            continue
        log(f"{prefix}: {'resuming' if state == INTERRUPTED else 'starting'}: {shlex.join(cmd)}")
        t0 = clock()
        rc = run(cmd, cwd=str(cwd)).returncode
        now = clock()
        launched += 1
        done = run_state(output_dir, spec) == FINISHED
        outcome[spec.name] = "finished" if rc == 0 and done else f"failed (exit {rc})"
        remaining = len(todo) - launched
        eta = (now - start) / launched * remaining
        log(f"{prefix}: {outcome[spec.name]} in {format_duration(now - t0)}; elapsed {format_duration(now - start)}, "
            f"{remaining} to go, ETA {format_duration(eta)}")
    return outcome


def spec_config(spec: RunSpec, output_dir: str | Path, overrides: Sequence[str] = (),
                configs_dir: str | Path = REPO_ROOT / "configs") -> Config:
    """The validated config a run of the sweep will use (train.py's own parsing)."""
    config = Path(configs_dir) / spec.dataset / f"{spec.method}.yaml"
    return config_from_args(parse(["--config", str(config), *spec.overrides(output_dir), *overrides]))


def is_multinode(cfg: Config) -> bool:
    """ImageNet configs go to the multi-node script, one job per run; the rest to the array."""
    return cfg.data.dataset in MULTINODE_DATASETS


#: slurm/imagenet_rcssr.sh's own #SBATCH --nodes / --gpus-per-node (used when a sweep gives none)
MULTINODE_DEFAULT_NODES, MULTINODE_DEFAULT_GPUS = 2, 8


def job_processes(cfg: Config, resources: SlurmResources | None = None) -> int:
    """The processes one run's job starts: nodes x GPUs per node (multi-node script), else the GPUs of one task."""
    res = resources or SlurmResources()
    if is_multinode(cfg):
        gpus = MULTINODE_DEFAULT_GPUS if res.gpus_per_node is None else res.gpus_per_node
        return (res.nodes or MULTINODE_DEFAULT_NODES) * max(1, gpus)
    return max(1, res.gpus_per_node or 1)


def preflight_specs(configs: dict[str, Config], resources: SlurmResources | None = None) -> list[str]:
    """Pre-flight each run's config for its job's processes: `<run name>: <problem>` lines (empty: submit)."""
    return [f"{name}: {problem}" for name, cfg in configs.items()
            for problem in preflight(cfg, job_processes(cfg, resources))]


def slurm_submission(specs: Sequence[RunSpec], output_dir: str | Path, overrides: Sequence[str] = (),
                     parallel: int = 8, script: str = ARRAY_SCRIPT,
                     resources: SlurmResources = SlurmResources()) -> tuple[list[str], dict[str, str]] | None:
    """(`sbatch` command, environment) submitting only the unfinished runs as array indices of
    `osr_sweep.sh`'s grid; None when every run is finished. The grid must be a full product
    (as :func:`expand` makes): the script rebuilds it from SWEEP_* variables."""
    if not specs:
        return None
    datasets = list(dict.fromkeys(s.dataset for s in specs))
    methods = list(dict.fromkeys(s.method for s in specs))
    splits = list(dict.fromkeys(s.split for s in specs))
    seeds = list(dict.fromkeys(s.seed for s in specs))
    tags = {s.tag for s in specs}
    if len(tags) != 1:
        raise ConfigError("a Slurm sweep needs one tag for all runs")
    tag = tags.pop()
    env = {"SWEEP_DATASETS": " ".join(datasets), "SWEEP_METHODS": " ".join(methods),
           "SWEEP_SEEDS": " ".join(map(str, seeds)), "SWEEP_TAG": tag}
    if list(specs) != _grid(datasets, methods, None, seeds, tag):
        if list(specs) != _grid(datasets, methods, splits, seeds, tag):
            raise ConfigError("osr_sweep.sh runs a full grid (data sets x splits x methods x seeds); this is not one")
        env["SWEEP_SPLITS"] = " ".join(splits)
    indices = [i for i, s in enumerate(specs) if run_state(output_dir, s) != FINISHED]
    if not indices:
        return None
    array = ",".join(map(str, indices))
    cmd = ["sbatch", *resources.sbatch_options(), f"--array={array}%{parallel}", script,
           f"run.output_dir={output_dir}", *overrides]
    return cmd, env


def multinode_submissions(specs: Sequence[RunSpec], output_dir: str | Path, overrides: Sequence[str] = (),
                          resources: SlurmResources = SlurmResources(),
                          script: str = MULTINODE_SCRIPT) -> list[list[str]]:
    """One `sbatch [resources] --job-name=<run> imagenet_rcssr.sh <config> <run overrides>` per unfinished run:
    each run gets its own allocation of N nodes x G GPUs (an array task is one node's worth)."""
    return [["sbatch", *resources.sbatch_options(), f"--job-name={spec.name}", script, spec.config,
             *spec.overrides(output_dir), *overrides]
            for spec in specs if run_state(output_dir, spec) != FINISHED]


def submit_slurm(specs: Sequence[RunSpec], args: argparse.Namespace, resources: SlurmResources,
                 run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> int:
    """Pre-flight every unfinished run, then submit the array or one multi-node job per run."""
    todo = [s for s in specs if run_state(args.output_dir, s) != FINISHED]
    if not todo:
        print(f"all {len(specs)} runs finished; nothing to submit")
        return 0
    configs = {s.name: spec_config(s, args.output_dir, args.overrides) for s in todo}
    if not args.no_preflight:
        problems = preflight_specs(configs, resources)
        for line in problems:
            print(f"preflight: {line}", file=sys.stderr)
        if problems:
            print(f"error: {len(problems)} pre-flight problem(s) in {len(todo)} run(s); nothing was submitted",
                  file=sys.stderr)
            return 2
    kinds = {is_multinode(cfg) for cfg in configs.values()}
    if len(kinds) > 1:
        raise ConfigError("this sweep mixes ImageNet configs (one multi-node job per run) with others (one array); "
                          "submit them as two sweeps")
    if kinds.pop():
        commands, env = multinode_submissions(specs, args.output_dir, args.overrides, resources), {}
    else:
        plan = slurm_submission(specs, args.output_dir, args.overrides, args.parallel, resources=resources)
        assert plan is not None  # todo is not empty
        commands, env = [plan[0]], plan[1]
    for i, cmd in enumerate(commands):
        print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd)]))
        rc = 0 if args.dry_run else run(cmd, cwd=REPO_ROOT, env={**os.environ, **env}).returncode
        if rc:  # sbatch said why; the rest would fail alike (partition, account, limits)
            print(f"error: sbatch exited {rc}; {len(commands) - i - 1} more job(s) not submitted; rerun the same "
                  "command to submit the rest", file=sys.stderr)
            return rc
    return 0


def main_launcher_default() -> list[str]:
    """`launchers/launch.py` under this interpreter: `accelerate launch` (the venv's) whose
    failed run ends in its one `error:` line, not in the launcher's traceback."""
    return [sys.executable, str(REPO_ROOT / "launchers" / "launch.py")]


USAGE = """Run a sweep (data sets x splits x methods x seeds), locally one run after another or as a
Slurm array; finished runs are skipped and interrupted ones resume.

    cssr-sweep --datasets fashion_mnist mnist --methods linear pcssr rcssr \\
        --launcher "python launchers/launch.py --num_processes 2" -- schedule.epochs=3
    cssr-sweep --datasets cifar10 svhn --slurm -- data.root=/data   # sbatch osr_sweep.sh (one array)
    cssr-sweep --datasets imagenet --methods openood_rcssr openood_rcssr_r50 --splits none --slurm \
        --partition gpu --account myproj --nodes 2 --gpus-per-node 8 --time 12:00:00 -- data.root=/shards
                                                    # one sbatch imagenet_rcssr.sh (2 x 8 GPUs) per run
    cssr-sweep ... --dry-run                                          # show the plan
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--methods", nargs="+", default=["linear", "pcssr", "rcssr"])
    p.add_argument("--splits", nargs="+", help="default: each data set's own (a-e, 0-4, default)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--tag", default="", help="run-name prefix")
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--launcher", help="command before train.py (default: this Python's launchers/launch.py, "
                   "which takes accelerate launch's options)")
    p.add_argument("--slurm", action="store_true", help="submit the unfinished runs: slurm/osr_sweep.sh as one array, "
                                                        "or one slurm/imagenet_rcssr.sh job per run for ImageNet configs")
    p.add_argument("--parallel", type=int, default=8, help="Slurm: array tasks running at once")
    p.add_argument("--partition", help="Slurm: partition (sbatch --partition)")
    p.add_argument("--account", help="Slurm: account to charge (sbatch --account)")
    p.add_argument("--nodes", type=int, help="Slurm: nodes per job (default: the script's, 2 for ImageNet, 1 array)")
    p.add_argument("--gpus-per-node", type=int, help="Slurm: GPUs per node = processes per node (default: the "
                                                     "script's, 8 for ImageNet, 1 array)")
    p.add_argument("--time", help="Slurm: time limit per job, minutes or [D-]HH:MM:SS (default: the script's)")
    p.add_argument("--cpus-per-task", type=int, help="Slurm: CPUs per node (default: the script's, 64 for ImageNet, "
                                                     "8 array)")
    p.add_argument("--no-preflight", action="store_true", help="Slurm: submit without checking shard indexes, "
                                                               "weights and output folders here (the job still does)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (after --)")
    args = p.parse_args(argv)
    args.output_dir = str(Path(args.output_dir).resolve())  # runs start in the repository root
    try:
        specs = expand(args.datasets, args.methods, args.splits, args.seeds, args.tag, REPO_ROOT / "configs")
        if args.slurm:
            resources = SlurmResources(args.partition, args.account, args.nodes, args.gpus_per_node, args.time,
                                       args.cpus_per_task).check()
            return submit_slurm(specs, args, resources)
        launcher = shlex.split(args.launcher) if args.launcher else main_launcher_default()
        outcome = run_local(specs, launcher, args.output_dir, args.overrides, cwd=REPO_ROOT, dry_run=args.dry_run)
    except CssrError as err:
        return report(err)
    failed = [name for name, state in outcome.items() if state.startswith("failed")]
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun the same command to resume them", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
