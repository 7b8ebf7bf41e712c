"""Averages the id tables' sparse gradients over data-parallel ranks with two dense collectives.

DDP's own path for sparse gradients (one gloo sparse all-reduce per table) corrupted the heap of
a training process in 12 of 54 two-rank CPU test fits here (torch 2.13, ``malloc(): unaligned
tcache chunk detected``); a plain ``DistributedDataParallel`` over ``nn.Embedding(sparse=True)``
died of it mid-training too, a dense one did not (``benchmarks/ddp_sparse_stress.py``). NCCL has
no sparse all-reduce at all. So the tables are kept out of DDP (:func:`ddp_ignore_sparse_tables`)
and their gradients are exchanged here with ``all_gather`` of plain byte tensors, which every
backend has: one for the per-table row counts, one for every table's rows and values packed together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

_INDEX = torch.int64


def ddp_ignore_sparse_tables(module: nn.Module, tables: list[nn.Parameter]) -> list[str]:
    """Marks ``tables`` for ``DistributedDataParallel(module)`` to leave alone (no broadcast, no
    gradient hooks); returns their names in ``module``."""
    ids = {id(p) for p in tables}
    names = [n for n, p in module.named_parameters() if id(p) in ids]
    module._ddp_params_and_buffers_to_ignore = names
    return names


def broadcast_tables(tables: list[nn.Parameter], src: int = 0) -> None:
    """Copies rank ``src``'s values of ``tables`` to every rank (DDP does this for the parameters
    it manages when it wraps the module)."""
    with torch.no_grad():
        for p in tables:
            dist.broadcast(p.data, src)


def average_sparse_grads(tables: list[nn.Parameter]) -> None:
    """Replaces each table's gradient by the mean of all ranks' gradients, the same on every rank.

    Every rank must call this with the same tables in the same order (a collective). A table whose
    ``.grad`` is None on a rank contributes nothing there; a table without a gradient on any rank
    keeps ``.grad`` None. The result is a coalesced sparse COO tensor: rank 0's rows first, then
    rank 1's, ..., summed per row by ``coalesce`` (a fixed order, so every rank gets the same bits).

    Args:
        tables: parameters [N, ...] whose ``.grad`` is None or a sparse COO tensor (possibly
            uncoalesced), as ``nn.Embedding(sparse=True)`` produces.
    """
    world = dist.get_world_size()
    device = tables[0].device if tables else torch.device("cpu")
    local = [None if p.grad is None else _coalesced(p) for p in tables]
    counts = torch.tensor([0 if g is None else g._nnz() for g in local], dtype=_INDEX, device=device)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    per_rank = torch.stack(all_counts).tolist()  # [world][table]
    row_bytes = [_INDEX.itemsize + _values_row_bytes(p) for p in tables]
    sizes = [sum(n * b for n, b in zip(rank_counts, row_bytes, strict=True)) for rank_counts in per_rank]
    if max(sizes, default=0) == 0:
        return
    payload = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    offset = 0
    for g in local:
        if g is None:
            continue
        for part in (g._indices()[0], g._values()):
            raw = part.contiguous().view(-1).view(torch.uint8)
            payload[offset:offset + raw.numel()] = raw
            offset += raw.numel()
    gathered = [torch.empty_like(payload) for _ in range(world)]
    dist.all_gather(gathered, payload)
    _unpack(tables, gathered, per_rank, world)


def _coalesced(p: nn.Parameter) -> torch.Tensor:
    if not p.grad.is_sparse:
        raise ValueError(f"average_sparse_grads: a table of shape {tuple(p.shape)} has a dense gradient")
    g = p.grad.coalesce()
    if g.sparse_dim() != 1:
        raise ValueError(f"average_sparse_grads: a table of shape {tuple(p.shape)} has a gradient sparse in "
                         f"{g.sparse_dim()} dims, not row-sparse")
    return g if g.dtype == p.dtype else g.to(p.dtype)


def _values_row_bytes(p: nn.Parameter) -> int:
    """Bytes of one gradient row of ``p`` (its trailing dims in its dtype)."""
    return p[0].numel() * p.element_size()


def _unpack(tables: list[nn.Parameter], gathered: list[torch.Tensor], per_rank: list[list[int]], world: int) -> None:
    """Sets each table's ``.grad`` from the ranks' packed rows (:func:`average_sparse_grads`)."""
    rows: list[list[torch.Tensor]] = [[] for _ in tables]
    values: list[list[torch.Tensor]] = [[] for _ in tables]
    for r, buf in enumerate(gathered):
        offset = 0
        for t, p in enumerate(tables):
            n = per_rank[r][t]
            if n == 0:
                continue
            nb = n * _INDEX.itemsize
            # clone: a slice at an odd byte offset cannot be viewed as a wider dtype
            rows[t].append(buf[offset:offset + nb].clone().view(_INDEX))
            offset += nb
            vb = n * _values_row_bytes(p)
            values[t].append(buf[offset:offset + vb].clone().view(p.dtype).view(n, *p.shape[1:]))
            offset += vb
    for t, p in enumerate(tables):
        if not rows[t]:
            p.grad = None
            continue
        idx = torch.cat(rows[t]).unsqueeze(0)
        val = torch.cat(values[t]) / world
        # checked: rows out of range (ranks disagreeing on the tables) fail here, not as a bad write later
        p.grad = torch.sparse_coo_tensor(idx, val, p.shape, check_invariants=True).coalesce()
