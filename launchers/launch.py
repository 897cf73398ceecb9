#!/usr/bin/env python
"""`accelerate launch` for schedulers: requeue exit code, signal forwarding, bounded waits.

    python launchers/launch.py [accelerate launch options] train.py [train.py arguments]

Takes exactly the options of `accelerate launch` and adds what a cluster job needs:

* **Exit code 42 survives.** A preempted worker exits 42 (checkpoint written, please
  requeue), but torchrun and Accelerate turn any worker failure into exit code 1. Here
  the root-cause worker's exit code is returned, so Slurm scripts can test for 42.
* **SIGUSR1 and SIGTERM reach the workers.** torchrun starts its workers in new
  sessions; USR1 would kill the launcher (default action) and leave orphans. The signals
  are forwarded to the worker processes, which finish their step, checkpoint and exit 42.
  torchrun's own SIGTERM handling is switched off (`TORCHELASTIC_SIGNALS_TO_HANDLE`): it
  would stop the agent with exit 143 and SIGKILL workers still writing their checkpoint
  after 30 s. As a second line, a worker that exits for requeue leaves a marker file in
  the launch's scratch folder (`CSSR_PREEMPT_MARKER`); whatever way the launch ends, the
  marker makes this launcher exit 42 (scancel, Slurm preemption, a signal to torchrun).
* **No 300 s exit barrier.** When one node's agent dies, torchrun's exit barrier keeps
  the others waiting 300 s; here it waits `CSSR_EXIT_BARRIER_TIMEOUT` seconds (60).
* **No litter.** torchrun leaves an empty `torchelastic_*` folder in TMPDIR per launch
  (W&B two more); here TMPDIR points to a private folder for the launch, removed at the
  end. It is made under TMPDIR when that path is short, else under /tmp: DataLoader
  workers pass tensors through Unix sockets in TMPDIR, whose paths may not exceed 107
  bytes ("AF_UNIX path too long", after which the loader waits for ever).
* **The first real error, alone.** A rank that stops on a user error (bad config, data or
  storage) prints one `error:` line and exits 2; the other ranks exit 2 quietly
  (`cssr_dist.distributed.peer_failed_first`). `accelerate launch` would then print
  torchrun's "Sending process ... closing signal" / "failed (exitcode: 2)" log lines and a
  `ChildFailedError` traceback (a `CalledProcessError` one for a single process;
  `accelerate launch --quiet` covers only that case, and turns exit 2 into 1). Here the
  launch ends with exit 2 and nothing after that line. Any other failure (a crash, a killed
  rank) still gets torchrun's table of every rank and the rank that failed first.
* **Multi-node options from the environment** when not given on the command line:
  `--machine_rank` from MACHINE_RANK or SLURM_NODEID, `--main_process_ip` from
  MASTER_ADDR, `--main_process_port` from MASTER_PORT (else, in a Slurm job, a port derived
  from SLURM_JOB_ID: every node of a job computes the same one, two jobs on one node differ),
  `--num_machines` from NNODES or SLURM_NNODES (only when the launch is multi-machine,
  `--num_machines` > 1 or a multi-node config file). One-machine launches use port 0 in the
  launcher files: Accelerate then takes a free port itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REQUEUE_EXIT_CODE = 42  # = cssr_dist.engine.preemption.REQUEUE_EXIT_CODE (kept import-free; pinned by a test)
USER_ERROR_EXIT = 2  # = cssr_dist.errors.USER_ERROR_EXIT (pinned by a test): the rank printed its one `error:` line
# torchrun's agent logs these as a failure unfolds; the launcher's own report at the end says the
# same (the ChildFailedError table for a crash), and for a user error they would follow its line
ELASTIC_LOGGER = "torch.distributed.elastic.multiprocessing.api"
REPEATED_BY_THE_REPORT = ("Sending process %s closing signal %s", "failed (exitcode: %s)")
FORWARDED = (signal.SIGUSR1, signal.SIGTERM)
MARKER_ENV = "CSSR_PREEMPT_MARKER"  # = cssr_dist.engine.preemption.MARKER_ENV
# signals torchrun's agent turns into "stop, SIGKILL the workers after 30 s, exit 128+N";
# SIGTERM is left to `_forward` so that the workers checkpoint and exit 42
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"

ENV_OPTIONS = (  # accelerate option, environment variables in order of preference
    ("--machine_rank", ("MACHINE_RANK", "SLURM_NODEID")),
    ("--main_process_ip", ("MASTER_ADDR",)),
    ("--main_process_port", ("MASTER_PORT",)),
    ("--num_machines", ("NNODES", "SLURM_NNODES")),
)


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux): torchrun's workers or the single worker."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def _forward(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    for pid in _children(os.getpid()):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


JOB_PORT_BASE, JOB_PORT_SPAN = 20000, 12000  # 20000-31999: below Linux's ephemeral ports (32768-60999)


def job_port() -> str | None:
    """The rendezvous port of this Slurm job when MASTER_PORT is not set: the same on every node."""
    job = os.environ.get("SLURM_JOB_ID", "")
    return str(JOB_PORT_BASE + int(job) % JOB_PORT_SPAN) if job.isdigit() else None


def _has(argv: list[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in argv)


def _script_index(argv: list[str]) -> int:
    """Position of the training script: everything after it belongs to train.py."""
    for i, arg in enumerate(argv):
        if arg.endswith(".py") and not arg.startswith("-"):
            return i
    return len(argv)


def _multi_machine(launcher_args: list[str]) -> bool:
    for i, arg in enumerate(launcher_args):
        if arg == "--num_machines" and i + 1 < len(launcher_args):
            return launcher_args[i + 1] != "1"
        if arg.startswith("--num_machines="):
            return arg.split("=", 1)[1] != "1"
        if arg == "--config_file" and i + 1 < len(launcher_args):
            return "num_machines: 1\n" not in Path(launcher_args[i + 1]).read_text() + "\n"
    return False


def with_env_options(argv: list[str]) -> list[str]:
    """Add multi-node options from the environment where the command line lacks them."""
    cut = _script_index(argv)
    launcher, rest = argv[:cut], argv[cut:]
    if not _multi_machine(launcher):
        return argv
    for option, names in ENV_OPTIONS:
        value = next((os.environ[n] for n in names if os.environ.get(n)), None)
        if value is None and option == "--main_process_port":
            value = job_port()
        if value is not None and not _has(launcher, option):
            launcher += [option, value]
    return launcher + rest


def _bound_exit_barrier(seconds: float, shutdown_s: float) -> None:
    """torchrun's agent waits `exit_barrier_timeout` (300 s) for dead peers; make it shorter.
    When it does stop workers itself, it gives them `shutdown_s` (torch: 30 s) before SIGKILL,
    enough to finish a checkpoint."""
    import inspect

    from torch.distributed.elastic.agent.server import local_elastic_agent as lea

    original = lea.LocalElasticAgent.__init__
    has_shutdown = "shutdown_timeout" in inspect.signature(original).parameters

    def init(self, *args, **kwargs):
        kwargs.setdefault("exit_barrier_timeout", seconds)
        if has_shutdown:
            kwargs.setdefault("shutdown_timeout", int(shutdown_s))
        original(self, *args, **kwargs)

    lea.LocalElasticAgent.__init__ = init


def _quiet_failure_log(record: logging.LogRecord) -> bool:
    """logging filter: drop torchrun's per-failure lines (kept: everything else it logs)."""
    return not str(record.msg).startswith(REPEATED_BY_THE_REPORT)


MAX_TMP_BASE = 50  # + /cssr-launch-XXXXXXXX/pymp-XXXXXXXX/listener-XXXXXXXX must stay < 108


def _scratch_base() -> str:
    base = os.environ.get("TMPDIR") or "/tmp"
    return base if len(base) <= MAX_TMP_BASE and os.path.isdir(base) else "/tmp"


def main(argv: list[str]) -> int:
    scratch = tempfile.mkdtemp(prefix="cssr-launch-", dir=_scratch_base())
    os.environ["TMPDIR"] = tempfile.tempdir = scratch  # torchrun's and the workers' temporary files
    marker = Path(scratch) / "preempted"
    os.environ[MARKER_ENV] = str(marker)
    os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", TORCHRUN_SIGNALS)
    try:
        code = _launch(argv)
        if code != 0 and marker.exists():
            if code != REQUEUE_EXIT_CODE:
                print(f"launch.py: a worker stopped for requeue ({marker.read_text().strip()}); exit "
                      f"{REQUEUE_EXIT_CODE} instead of {code}", file=sys.stderr)
            return REQUEUE_EXIT_CODE
        return code
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _launch(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for sig in FORWARDED:  # torchrun replaces the SIGTERM handler with its own forwarding one
        signal.signal(sig, _forward)
    _bound_exit_barrier(float(os.environ.get("CSSR_EXIT_BARRIER_TIMEOUT", "60")),
                        float(os.environ.get("CSSR_SHUTDOWN_TIMEOUT", "300")))
    logging.getLogger(ELASTIC_LOGGER).addFilter(_quiet_failure_log)
    args = launch_command_parser().parse_args(with_env_options(argv))
    try:
        launch_command(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode == USER_ERROR_EXIT:  # that rank's `error:` line is the whole report
            return USER_ERROR_EXIT
        if failure.exitcode == REQUEUE_EXIT_CODE:
            print(f"launch.py: workers stopped for requeue (rank {rank} exit {REQUEUE_EXIT_CODE})", file=sys.stderr)
            return REQUEUE_EXIT_CODE
        print(err.format_msg(), file=sys.stderr)
        print(f"launch.py: rank {rank} failed first (exit code {failure.exitcode})", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as err:  # the one-process launcher
        return err.returncode if err.returncode > 0 else 128 - err.returncode
    except SignalException as err:
        print(f"launch.py: launcher stopped by signal {err.sigval}", file=sys.stderr)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
