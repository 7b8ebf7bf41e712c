"""Pooling of a user's recent products and sellers into one vector: mean, recency-weighted mean or attention."""

from __future__ import annotations

import math

import torch
from torch import nn

from towers.embeddings import masked_mean

POOLINGS = ("mean", "recency", "attention")


def recency_positions(mask: torch.Tensor, max_pos: int) -> torch.Tensor:
    """Recency position of each history entry, 0 for the latest: [B, L] int64 (clamped to ``max_pos``).

    Histories are oldest first and left-aligned, so the position counts back from the last kept
    entry; entries dropped in training (history dropout leaves holes) still count as positions.
    """
    slots = torch.arange(1, mask.shape[1] + 1, device=mask.device).unsqueeze(0)
    lengths = (slots * mask).amax(1, keepdim=True) if mask.shape[1] else slots.sum(1, keepdim=True)
    return (lengths - slots).clamp(0, max_pos)


class HistoryEncoder(nn.Module):
    """Pools history item vectors [B, L, d] (0-padded, ``mask`` [B, L]) into [B, d].

    ``mean``: masked mean. ``recency``: a mean weighted by a learned weight per recency position
    (0 = the latest item; starts equal, so it starts as the mean and learns how fast the past fades).
    ``attention``: a learned query attends over the items (plus a recency position embedding),
    mixed with the mean so short histories stay stable.
    """

    def __init__(self, dim: int, pooling: str = "mean", max_len: int = 512):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"model.history_pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        if pooling == "recency":
            self.log_recency = nn.Parameter(torch.zeros(max_len))
        if pooling == "attention":
            self.query = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
            self.key = nn.Linear(dim, dim, bias=False)
            self.pos = nn.Embedding(max_len, dim)
            nn.init.normal_(self.pos.weight, std=0.01)

    def recency_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """The ``recency`` pooling's weight of each entry: [B, L] float, 0 where ``mask`` is false."""
        w = self.log_recency.exp()[recency_positions(mask, self.log_recency.shape[0] - 1)]
        return w * mask.to(w.dtype)

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Args: items [B, L, d], mask [B, L] bool. Returns [B, d]."""
        if self.pooling == "recency":
            w = self.recency_weights(mask)
            return (w.unsqueeze(-1) * items).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-12)
        mean = masked_mean(items, mask)
        if self.pooling == "mean":
            return mean
        pos = recency_positions(mask, self.pos.num_embeddings - 1)
        k = self.key(items + self.pos(pos))
        logits = (k @ self.query) / math.sqrt(items.shape[-1])
        logits = logits.masked_fill(~mask, -1e4)
        w = torch.softmax(logits, dim=1) * mask.to(items.dtype)
        att = (w.unsqueeze(-1) * items).sum(1)
        return 0.5 * (att + mean)
