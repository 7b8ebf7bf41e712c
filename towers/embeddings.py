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


def ragged_mean(
    table: nn.Embedding,
    idx: torch.Tensor,
    mask: torch.Tensor,
    denom: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (or ``weights``-weighted mean) of ``table`` rows over the unmasked entries of each row of ``idx``.

    Looks up each distinct id once and pools with ``embedding_bag`` over the compacted ids, so the
    sparse gradient has one row per distinct id instead of B × L rows (coalescing those rows was
    the largest cost of a CPU training step) and no [B, L, d] tensor is materialised.

    Args:
        table: the embedding table.
        idx: [B, L] int64 ids.
        mask: [B, L] bool, the entries to pool.
        denom: [B] the divisor (default: the number, or with ``weights`` the total weight, of the
            row's entries).
        weights: [B, L] non-negative float weights (differentiable), or None for equal weights.

    Returns:
        [B, d]; zeros for rows without entries.
    """
    counts = mask.sum(1)
    flat = idx[mask]
    if flat.numel() == 0:
        return torch.zeros(idx.shape[0], table.embedding_dim, device=idx.device, dtype=table.weight.dtype)
    uniq, inv = torch.unique(flat, return_inverse=True)
    rows = table(uniq)
    offsets = torch.cumsum(counts, 0) - counts
    w = None if weights is None else weights[mask].to(rows.dtype)
    summed = F.embedding_bag(inv, rows, offsets, mode="sum", per_sample_weights=w)
    if denom is None:
        denom = counts if weights is None else (weights * mask).sum(1)
    d = denom.unsqueeze(1).to(summed.dtype)
    return summed / (d.clamp_min(1) if weights is None else d.clamp_min(1e-12))
