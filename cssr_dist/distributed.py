"""Ground-level helpers for work split across ranks: who am I, gather by sample id, the
bare module for evaluation.

They live below every package (data, scoring, eval and engine all use them) so that no
lower layer imports the engine. Evaluation shards sets exactly (no padded repeats), so
per-sample outputs are gathered with their ids and de-duplicated before any metric.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from datetime import timedelta

import numpy as np
import torch

from .stacks import print_stacks_on_signal


def dist_info() -> tuple[int, int]:
    """(rank, world size): torch.distributed if initialised, else env RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


#: how long an erring rank waits for torchrun's store before it prints its line anyway
STORE_TIMEOUT_S = 10.0


def _agent_store() -> torch.distributed.Store | None:
    """A client of torchrun's agent store (it outlives every worker), or None: one process,
    not launched by torchrun, or the store is unreachable.

    Why the agent's store and not the process group's: an error may come before the group
    exists (a config error on every rank), and a rank that hosted the group's store could be
    the one that failed. The agent serves it at MASTER_ADDR:MASTER_PORT when it sets
    TORCHELASTIC_USE_AGENT_STORE (torch.distributed.rendezvous), on every node of the job.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        return torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                          timeout=timedelta(seconds=STORE_TIMEOUT_S))
    except (KeyError, ValueError, RuntimeError):
        return None


def _user_error_key() -> str:
    """One key per launch attempt (torchrun's restarts start a new attempt)."""
    return f"cssr/user_error/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def claim_first_error() -> bool:
    """Announce a user error of this rank to the job; True when it is the job's first, so this
    rank prints the one `error:` line and every later one stays quiet (the same config error
    raised on every rank is printed once, not once per rank).

    Called BEFORE the rank exits: the other ranks' collectives fail only when its sockets
    close, so by then `peer_failed_first` already sees the announcement. Outside torchrun, or
    with the store unreachable, every rank prints its own error (True).
    """
    store = _agent_store()
    if store is None:
        return True
    try:
        return store.add(_user_error_key(), 1) == 1
    except RuntimeError:
        return True


def peer_failed_first(wait_s: float = 0.0) -> bool:
    """True when a rank of this job stopped with a user error (waiting up to `wait_s` for it
    to say so): an exception here (a collective whose peer is gone, a barrier that broke, a
    write that failed elsewhere) is its consequence, not news, and this rank exits without a
    line or traceback that would bury that rank's line."""
    store = _agent_store()
    if store is None:
        return False
    try:
        if wait_s > 0:
            store.wait([_user_error_key()], timedelta(seconds=wait_s))
            return True
        return bool(store.check([_user_error_key()]))
    except RuntimeError:  # DistStoreError (a RuntimeError): not announced in time, or no store
        return False


def concat_local(chunks: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Per-batch tensors -> one numpy array per key (host copy once, at the end)."""
    if not chunks:
        return {}
    return {key: torch.cat([c[key] for c in chunks]).cpu().numpy() for key in chunks[0]}


def gather_by_id(local: dict[str, np.ndarray], world_size: int) -> dict[str, np.ndarray]:
    """All ranks' per-sample arrays joined, de-duplicated by `ids`, sorted by id.

    The objects travel between the ranks of one job (torch's object collectives), never
    through files.
    """
    if world_size > 1:
        from accelerate.utils import gather_object  # start-up time: Accelerate only with several ranks

        parts = gather_object([local])
    else:
        parts = [local]
    parts = [p for p in parts if p]
    if not parts:
        return {}
    joined = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    _, first = np.unique(joined["ids"], return_index=True)
    return {key: value[first] for key, value in joined.items()}


def eval_module(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The bare module for evaluation, with rank 0's buffers on every rank.

    DDP's forward broadcasts buffers (a collective) on every call, so evaluating through
    the wrapper deadlocks as soon as ranks hold different numbers of evaluation batches
    (exact sharding, shard sets). The buffers (BatchNorm statistics, which each rank updated
    with its own last batch) are broadcast once here instead: every rank scores one model.
    """
    module = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer.data, src=0)
    return module


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """`worker_init_fn` of DataLoader workers: survive a SIGTERM/SIGUSR1 sent to the whole
    process group (Slurm's time limit, scancel, preemption) so the main process can finish
    its step and checkpoint; it ends its workers itself.

    Why not SIG_IGN: the main process's own shutdown (multiprocessing's exit handler) ends
    stuck workers with SIGTERM and then waits for them, which would wait for ever. So the
    rule is torch's own for its workers: a SIGTERM from the parent ends the worker at once,
    any other is ignored. The sender is only known to `sigwaitinfo`, hence SIGTERM is blocked
    and read by a small thread (a no-op handler covers threads that started earlier).
    """
    print_stacks_on_signal()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    # the loader's process, which started this worker; not getppid(): with a fork server
    # (readers/base.py) that is the server
    creator = multiprocessing.parent_process()
    parent = creator.pid if creator is not None else os.getppid()

    def wait_for_parent_sigterm() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait_for_parent_sigterm, name="sigterm-from-parent", daemon=True).start()
