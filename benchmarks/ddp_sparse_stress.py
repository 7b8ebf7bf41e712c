"""Stress test: two-process CPU DDP (gloo) over sparse embedding tables, repeated; counts the runs
in which a rank dies, in training or at teardown (after its last step).

``--exchange ddp`` lets DDP all-reduce the tables' sparse gradients itself (a gloo sparse
all-reduce per table); ``--exchange allgather`` keeps the tables out of DDP and averages their
gradients with ``towers.sparse_grad_sync`` as training does; ``--dense`` uses dense tables.
``--fit`` repeats the project's own 2-process fit test (``tests/test_towers_ddp.py -k two_process``:
the towers' training code, the exchange included).

    python benchmarks/ddp_sparse_stress.py --runs 12 --steps 3000 --exchange ddp
    python benchmarks/ddp_sparse_stress.py --runs 30 --fit
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from towers.ddp import free_port
from towers.sparse_grad_sync import average_sparse_grads, broadcast_tables, ddp_ignore_sparse_tables


class _Model(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.items = nn.Embedding(5000, 32, sparse=sparse)
        self.users = nn.Embedding(300, 32, sparse=sparse)
        self.proj = nn.Linear(32, 32)

    def forward(self, hist: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        return (self.proj(self.items(hist).mean(1)) * self.users(user)).sum()


def _rank(rank: int, steps: int, exchange: str, sparse: bool) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)
    torch.set_num_threads(1)
    model = _Model(sparse)
    tables = [model.items.weight, model.users.weight] if sparse and exchange == "allgather" else []
    if tables:
        ddp_ignore_sparse_tables(model, tables)
        broadcast_tables(tables)
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    for _ in range(steps):
        loss = ddp(torch.randint(0, 5000, (64, 20)), torch.randint(0, 300, (64,)))
        loss.backward()
        if tables:
            average_sparse_grads(tables)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-1e-3)
                p.grad = None
    print("trained", flush=True)  # a death after this is one of teardown, not of training
    dist.destroy_process_group()


def _repeat_fit(runs: int) -> None:
    """Runs the 2-process fit test of ``tests/test_towers_ddp.py`` ``runs`` times; counts the failures."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_towers_ddp.py", "-k", "two_process"]
    failed = 0
    for run in range(runs):
        t = time.perf_counter()
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "LIBC_FATAL_STDERR_": "1"})
        failed += out.returncode != 0
        why = [x.strip() for x in out.stdout.splitlines() if "exited with status" in x or "malloc" in x][:2]
        print(f"run {run}: exit code {out.returncode}, {time.perf_counter() - t:.0f} s {' '.join(why)}", flush=True)
    print(f"2-process fit: {failed} of {runs} runs failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--exchange", choices=("ddp", "allgather"), default="allgather")
    ap.add_argument("--dense", action="store_true", help="dense tables (DDP all-reduces them as usual)")
    ap.add_argument("--fit", action="store_true", help="repeat the project's 2-process test fit instead")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fit:
        _repeat_fit(args.runs)
        return
    if args.rank is not None:
        _rank(args.rank, args.steps, args.exchange, not args.dense)
        return
    died = died_after = 0
    for run in range(args.runs):
        # glibc reports heap corruption on the terminal unless told to use stderr
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LIBC_FATAL_STDERR_": "1"}
        cmd = [sys.executable, __file__, "--steps", str(args.steps), "--exchange", args.exchange,
               *(["--dense"] if args.dense else [])]
        t = time.perf_counter()
        procs = [subprocess.Popen([*cmd, "--rank", str(r)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for r in range(2)]
        outs = [p.communicate() for p in procs]
        codes = [p.returncode for p in procs]
        trained = ["trained" in out for out, _ in outs]
        died += not all(trained)
        died_after += all(trained) and any(codes)
        why = ""
        for code, (_, err) in zip(codes, outs, strict=True):
            if code < 0:  # killed by a signal: its own last words, not its peer's lost connection
                lines = [x for x in err.splitlines() if x.strip() and "Warning" not in x]
                why += f"  [signal {-code}] {lines[-1] if lines else ''}"
        print(f"run {run}: exit codes {codes}, finished training {trained}, {time.perf_counter() - t:.0f} s{why}", flush=True)
    kind = "dense" if args.dense else f"sparse, exchange={args.exchange}"
    print(f"{kind}: {died} of {args.runs} runs had a rank die in training, {died_after} more in teardown "
          f"({args.steps} steps each)")


if __name__ == "__main__":
    main()
