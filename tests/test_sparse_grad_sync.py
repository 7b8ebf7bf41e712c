"""Averaging sparse table gradients over two gloo ranks, outside DDP (towers.sparse_grad_sync)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from towers.ddp import free_port
from towers.sparse_grad_sync import average_sparse_grads, broadcast_tables, ddp_ignore_sparse_tables

SHAPES = [(10, 3), (5, 2), (4, 2), (6, 1)]


def _grads(rank: int) -> list[torch.Tensor | None]:
    """Each rank's gradients: uncoalesced rows, a table without a gradient on one rank, on both,
    and an empty sparse gradient."""
    g = torch.Generator().manual_seed(rank)

    def sp(rows, shape):
        return torch.sparse_coo_tensor(torch.tensor([rows]), torch.randn(len(rows), shape[1], generator=g), shape,
                                       check_invariants=True)

    if rank == 0:
        return [sp([1, 3, 1], SHAPES[0]), None, None, torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long),
                                                                         torch.zeros(0, 1), SHAPES[3],
                                                                         check_invariants=True)]
    return [sp([3, 7], SHAPES[0]), sp([2], SHAPES[1]), None, sp([5, 0], SHAPES[3])]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        tables = [nn.Parameter(torch.full(s, float(rank))) for s in SHAPES]
        broadcast_tables(tables)
        for p, g in zip(tables, _grads(rank), strict=True):
            p.grad = g
        average_sparse_grads(tables)
        result = {"values": [p.detach().clone() for p in tables],
                  "grads": [None if p.grad is None else p.grad for p in tables]}
        # DDP leaves the marked table alone: no gradient hook, no broadcast at wrap time
        model = nn.Sequential(nn.Embedding(8, 2, sparse=True), nn.Linear(2, 1))
        with torch.no_grad():
            model[0].weight.fill_(float(rank))
        names = ddp_ignore_sparse_tables(model, [model[0].weight])
        ddp = DistributedDataParallel(model)
        result["ignored"] = (names, sorted(ddp.parameters_to_ignore), model[0].weight[0, 0].item())
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_get_the_mean_gradient_bit_for_bit(tmp_path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    expected = []
    for a, b in zip(_grads(0), _grads(1), strict=True):
        parts = [x.to_dense() for x in (a, b) if x is not None]
        expected.append(None if not parts else sum(parts) / 2)
    assert expected[2] is None and r0["grads"][2] is None and r1["grads"][2] is None
    for t, want in enumerate(expected):
        if want is None:
            continue
        for r in (r0, r1):
            got = r["grads"][t]
            assert got.is_sparse and got.is_coalesced()
            torch.testing.assert_close(got.to_dense(), want, rtol=0, atol=1e-7)
        # the same bits on both ranks: their tables stay equal after the optimizer step
        assert torch.equal(r0["grads"][t].indices(), r1["grads"][t].indices())
        assert torch.equal(r0["grads"][t].values(), r1["grads"][t].values())
    # only the rows some rank touched are in the gradient
    assert r0["grads"][0].indices()[0].tolist() == [1, 3, 7]
    assert r0["grads"][3].indices()[0].tolist() == [0, 5]
    # broadcast_tables copied rank 0's values to rank 1
    assert all(torch.equal(v, torch.zeros_like(v)) for v in r1["values"])
    for r, rank in ((r0, 0), (r1, 1)):
        names, ignored, kept = r["ignored"]
        assert names == ["0.weight"] and ignored == ["0.weight"]
        assert kept == float(rank)  # DDP did not broadcast the ignored table


def test_one_rank_keeps_its_gradient_and_a_dense_one_is_refused(tmp_path) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        p = nn.Parameter(torch.zeros(10, 3))
        p.grad = _grads(0)[0]
        want = p.grad.to_dense()
        average_sparse_grads([p])
        assert p.grad.is_sparse and p.grad.is_coalesced()
        torch.testing.assert_close(p.grad.to_dense(), want, rtol=0, atol=0)
        p.grad = torch.ones(10, 3)
        with pytest.raises(ValueError, match=r"a table of shape \(10, 3\) has a dense gradient"):
            average_sparse_grads([p])
    finally:
        dist.destroy_process_group()
