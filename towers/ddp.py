"""Data-parallel training on one machine: one process per device, started here, not by Lightning.

Lightning's own ``ddp`` launcher starts ranks 1..N-1 by running the command line again
(``sys.argv``). For ``recsys fit`` that is the whole pipeline: the copies would walk through prepare,
train, refit, evaluate, export and index next to rank 0 and write the same artifacts. Here the
training stage starts its workers itself, each running only that stage's training
(``python -m towers.ddp_worker SPEC``), and marks its own process as rank 0 while the fit runs. Lightning
then sees processes "created externally" (``LOCAL_RANK`` set) and only joins them into a process
group. Processes started by someone else (``torchrun``, a cluster scheduler) are left alone.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Strategies this launcher runs on several devices; Lightning picks DDP for "auto" with devices > 1.
DDP_STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


def local_processes(strategy: str, accelerator: str, devices: int) -> int:
    """How many training processes one fit runs on this machine.

    Args:
        strategy, accelerator, devices: ``train.strategy``, ``train.accelerator``, ``train.devices``
            (``-1``: every GPU).
    Returns:
        ``devices`` for data-parallel training on several devices, else 1.
    Raises:
        ValueError: an unsupported combination, naming the setting.
    """
    if devices == -1:
        if accelerator not in ("gpu", "cuda"):
            raise ValueError("train.devices=-1 (all devices) needs train.accelerator=gpu; give a number of CPU processes")
        devices = torch.cuda.device_count()
        if devices == 0:
            raise ValueError("train.devices=-1 (every GPU): no GPU is visible to torch")
    if devices < 1:
        raise ValueError(f"train.devices must be >= 1 (or -1 for every GPU), got {devices}")
    if devices == 1:
        return 1
    if strategy not in DDP_STRATEGIES:
        raise ValueError(
            f"train.strategy={strategy!r} with train.devices={devices}: multi-device training runs as DDP "
            f"(train.strategy one of {', '.join(DDP_STRATEGIES)})"
        )
    return devices


def lightning_strategy(strategy: str, processes: int):
    """The ``Trainer(strategy=...)`` value: ``strategy`` itself for one process, else DDP with
    unused-parameter detection (a step may leave a tower out: a task of weight 0, a batch without
    sellers) and no buffer broadcast before each forward (the buffers are the catalog's, equal on
    every rank and constant; broadcasting them would copy product-sized tables every step)."""
    if processes <= 1:
        return strategy
    from pytorch_lightning.strategies import DDPStrategy

    return DDPStrategy(find_unused_parameters=True, forward_sync_buffers=False)


def externally_launched() -> bool:
    """Whether this process is one rank of a group someone else started (torchrun, a worker of ours)."""
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def process_rank() -> int:
    """This process's global rank from the launch environment (0 outside data-parallel training)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def worker_processes(processes: int, command: list[str], log_dir: str | Path, join_timeout_s: float = 600.0,
                     grace_s: float = 60.0) -> Iterator[None]:
    """Run ranks 1..``processes``-1 as ``command`` and this process as rank 0 inside the block.

    Each worker writes its output to ``log_dir/rank<R>.log``. The block is expected to run a
    Lightning fit that joins the workers. If a worker fails while the block runs, the others are
    killed and the block is interrupted (``KeyboardInterrupt`` in the main thread); a rank 0 stuck
    in a collective that cannot be interrupted is killed after ``grace_s`` (it would otherwise wait
    for the dead peer until the process group's timeout). When the block raises, the workers are
    killed. Nothing happens for one process or when this process was itself started as a rank
    (``externally_launched``).

    Args:
        processes: world size on this machine.
        command: argv of a worker (it reads its rank from ``LOCAL_RANK``).
        log_dir: directory for the workers' logs.
        join_timeout_s: how long to wait for the workers to exit after the block.
        grace_s: how long an interrupted rank 0 has to leave the block before it is killed.
    Raises:
        RuntimeError: a worker failed while the block ran (naming its rank, exit status and log, with
            the log's end). A worker failing or hanging after the block is logged as a warning.
    """
    if processes <= 1 or externally_launched():
        yield
        return
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    launch = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NODE_RANK": "0",
              "WORLD_SIZE": str(processes)}
    saved = {k: os.environ.get(k) for k in LAUNCH_ENV}
    procs: list[tuple[int, subprocess.Popen, Path]] = []
    done = threading.Event()
    try:
        for rank in range(1, processes):
            path = log_dir / f"rank{rank}.log"
            with open(path, "wb") as out:
                env = {**os.environ, **launch, "LOCAL_RANK": str(rank), "RECSYS_PARENT_PID": str(os.getpid())}
                procs.append((rank, subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT), path))
        detected: list[str] = []
        threading.Thread(target=_watch, args=(procs, done, grace_s, detected), daemon=True, name="ddp-worker-watch").start()
        os.environ.update(launch, LOCAL_RANK="0")
        try:
            yield
        except BaseException as e:
            done.set()
            # A worker that was already dead caused this (the watcher's interrupt, or a collective
            # that lost its peer). One that dies later dies of rank 0's own error, which is the one
            # to report: rank 0 still holds the process group here, so its peers are still waiting.
            failure = detected[0] if detected else _failure(procs, wait_s=0.5)
            if failure:
                raise RuntimeError(failure) from e
            raise
        done.set()
        # The fit ended on rank 0, so every collective completed and the weights are whole: a worker
        # that fails or hangs on its way out is reported, not fatal.
        for rank, proc, path in procs:
            try:
                proc.wait(timeout=join_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("training rank %d did not exit %.0f s after rank 0 (killed); its log: %s", rank, join_timeout_s, path)
        failure = _failure(procs, wait_s=0.0)
        if failure:
            log.warning("after the fit, %s", failure)
    finally:
        done.set()
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # the next fit (the refit) starts a new group with new workers
            torch.distributed.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _failure(procs: list[tuple[int, subprocess.Popen, Path]], wait_s: float) -> str | None:
    """A message naming the first worker that exited with a non-zero status (waiting up to
    ``wait_s`` for one: a peer's death can reach rank 0 as an error before its exit status), or None."""
    deadline = time.monotonic() + wait_s
    while True:
        for rank, proc, path in procs:
            rc = proc.poll()
            if rc is not None and rc != 0:
                tail = path.read_text(errors="replace").strip().splitlines()[-15:]
                return f"training rank {rank} exited with status {rc}; its log: {path}\n" + "\n".join(f"  | {x}" for x in tail)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def _watch(procs: list[tuple[int, subprocess.Popen, Path]], done: threading.Event, grace_s: float, detected: list[str],
           period_s: float = 1.0) -> None:
    while not done.wait(period_s):
        failure = _failure(procs, wait_s=0.0)
        if failure is None:
            continue
        detected.append(failure)
        for _, other, _ in procs:
            if other.poll() is None:
                other.kill()
        _thread.interrupt_main()
        if not done.wait(grace_s):
            sys.stderr.write(f"error: {failure}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return


def exit_with_parent(poll_s: float = 2.0) -> None:
    """In a worker: exit when the process that started it is gone (killed rank 0 leaves no orphans
    waiting in a collective until the process group's timeout)."""
    parent = int(os.environ.get("RECSYS_PARENT_PID", "0") or 0)
    if parent <= 0:
        return

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="ddp-parent-watch").start()


__all__ = ["lightning_strategy", "local_processes", "process_rank", "worker_processes", "externally_launched", "exit_with_parent"]
