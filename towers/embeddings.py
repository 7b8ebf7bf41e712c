"""Embedding tables shared by the towers (sparse gradients for a sparse-aware optimizer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def embedding(n: int, dim: int, sparse: bool, std: float = 0.05) -> nn.Embedding:
    """An ``nn.Embedding`` with index 0 as the unknown/padding row, initialised N(0, std).

    Row 0 stays trainable: unknown ids share it, so it learns a sensible default.
    """
    emb = nn.Embedding(max(n, 1), dim, sparse=sparse)
    nn.init.normal_(emb.weight, std=std)
    return emb


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over axis 1 of ``x`` [B, L, d] where ``mask`` [B, L] is true; zeros for empty rows."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def sorted_groups(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups equal ids by one sort.

    Args:
        ids: [E] int64.
    Returns:
        ``(uniq [U], order [E], counts [U], starts [U])``: the distinct ids ascending, the
        permutation that sorts ``ids``, and where each id's run starts and how long it is in
        ``ids[order]`` (the offsets an ``embedding_bag`` over ``order`` needs to sum per id).
    """
    sorted_ids, order = torch.sort(ids)
    uniq, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    return uniq, order, counts, torch.cumsum(counts, 0) - counts


def ragged_mean(
    table: nn.Embedding,
    idx: torch.Tensor,
    mask: torch.Tensor,
    denom: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (or ``weights``-weighted mean) of ``table`` rows over the unmasked entries of each row of ``idx``.

    Pools with :class:`PooledRows`: each distinct id is looked up once, no [B, L, d] tensor is
    materialised, and the table's gradient has one row per distinct id. Several weightings of the
    same entries (``weights`` [P, B, L]) share one lookup.

    Args:
        table: the embedding table.
        idx: [B, L] int64 ids.
        mask: [B, L] bool, the entries to pool.
        denom: [B] (or [P, B]) the divisor (default: the number, or with ``weights`` the total
            weight, of the row's entries).
        weights: [B, L] or [P, B, L] non-negative float weights (differentiable), or None for equal weights.

    Returns:
        [B, d] (or [P, B, d] with [P, B, L] weights); zeros for rows without entries.
    """
    profiles = weights is not None and weights.dim() == 3
    w3 = None if weights is None else (weights if profiles else weights.unsqueeze(0))
    P = 1 if w3 is None else w3.shape[0]
    counts = mask.sum(1)
    flat = idx[mask]
    if flat.numel() == 0:
        out = torch.zeros(P, idx.shape[0], table.embedding_dim, device=idx.device, dtype=table.weight.dtype)
        return out if profiles else out[0]
    w = None if w3 is None else w3[:, mask].to(table.weight.dtype)
    summed = PooledRows.apply(table.weight, flat, counts, w, bool(table.sparse))
    if denom is None:
        denom = counts.unsqueeze(0) if w3 is None else (w3 * mask).sum(-1)
    d = denom.reshape(-1, idx.shape[0], 1).to(summed.dtype)
    out = summed / (d.clamp_min(1) if weights is None else d.clamp_min(1e-12))
    return out if profiles else out[0]


class PooledRows(torch.autograd.Function):
    """Per-bag (weighted) sums of table rows, with a backward that is one more ``embedding_bag``.

    Forward: sort the ids once, look each distinct id up once and sum the rows of each bag with
    ``embedding_bag`` (once per weighting). Backward: the table's gradient rows are the bags'
    output gradients summed per distinct id, which is again an ``embedding_bag`` (over the
    entries sorted by id, which the forward already has), returned as a coalesced row-sparse
    tensor for a sparse table. Autograd through ``embedding`` + ``embedding_bag`` computes the same
    numbers (``tests/test_pooled_rows.py``) but sorts the ids again in the backward and scatters
    entry by entry.
    """

    @staticmethod
    def forward(ctx, weight, flat, counts, entry_weights, sparse):
        """Args:
            weight: [N, d] the table.
            flat: [E] int64 ids, bag by bag.
            counts: [B] int64 entries per bag (sum E).
            entry_weights: [P, E] float weights (P weightings of the same entries), or None (P = 1).
            sparse: return a sparse COO gradient for ``weight``.
        Returns:
            [P, B, d] the per-bag sums.
        """
        uniq, order, per_id, id_starts = sorted_groups(flat)
        inv = torch.empty_like(flat)
        inv[order] = torch.repeat_interleave(torch.arange(uniq.shape[0], device=flat.device), per_id)
        rows = weight.index_select(0, uniq)
        offsets = torch.cumsum(counts, 0) - counts
        ws = [None] if entry_weights is None else list(entry_weights)
        out = torch.stack([F.embedding_bag(inv, rows, offsets, mode="sum", per_sample_weights=w) for w in ws])
        bag = torch.repeat_interleave(torch.arange(counts.shape[0], device=flat.device), counts)
        w_sorted = None if entry_weights is None else entry_weights[:, order]
        # the weights' gradient needs each entry's row and bag; the table's only the sorted bags
        extra = (rows, inv, bag) if ctx.needs_input_grad[3] else ()
        ctx.save_for_backward(uniq, id_starts, bag[order], w_sorted, *extra)
        ctx.weight_shape = weight.shape
        ctx.sparse = sparse
        return out

    @staticmethod
    def backward(ctx, grad_out):
        uniq, id_starts, bag_sorted, w_sorted, *extra = ctx.saved_tensors
        grad_weight = grad_w = None
        grad_out = grad_out.contiguous()
        if ctx.needs_input_grad[0]:
            ws = [None] * grad_out.shape[0] if w_sorted is None else list(w_sorted)
            g_rows = F.embedding_bag(bag_sorted, grad_out[0], id_starts, mode="sum", per_sample_weights=ws[0])
            for g, w in zip(grad_out[1:], ws[1:], strict=True):
                g_rows = g_rows + F.embedding_bag(bag_sorted, g, id_starts, mode="sum", per_sample_weights=w)
            if ctx.sparse:
                grad_weight = torch.sparse_coo_tensor(
                    uniq.unsqueeze(0), g_rows, ctx.weight_shape, is_coalesced=True, check_invariants=False
                )
            else:
                grad_weight = torch.zeros(ctx.weight_shape, dtype=g_rows.dtype, device=g_rows.device)
                grad_weight.index_copy_(0, uniq, g_rows)
        if ctx.needs_input_grad[3]:
            rows, inv, bag = extra
            entry_rows = rows[inv]
            grad_w = torch.stack([(entry_rows * g[bag]).sum(-1) for g in grad_out])
        return grad_weight, None, None, grad_w, None
