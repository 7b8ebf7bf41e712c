"""Pooling of a user's recent products and sellers into one vector: mean or attention."""

from __future__ import annotations

import math

import torch
from torch import nn

from towers.embeddings import masked_mean


class HistoryEncoder(nn.Module):
    """Pools history item vectors [B, L, d] (0-padded, ``mask`` [B, L]) into [B, d].

    ``mean``: masked mean. ``attention``: a learned query attends over the items (plus a recency
    position embedding), mixed with the mean so short histories stay stable.
    """

    def __init__(self, dim: int, pooling: str = "mean", max_len: int = 512):
        super().__init__()
        if pooling not in ("mean", "attention"):
            raise ValueError(f"model.history_pooling must be 'mean' or 'attention', got {pooling!r}")
        self.pooling = pooling
        if pooling == "attention":
            self.query = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
            self.key = nn.Linear(dim, dim, bias=False)
            self.pos = nn.Embedding(max_len, dim)
            nn.init.normal_(self.pos.weight, std=0.01)

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mean = masked_mean(items, mask)
        if self.pooling == "mean":
            return mean
        L = items.shape[1]
        # Recency position: 0 for the most recent item. Histories are left-aligned, so count back from the length.
        lengths = mask.sum(1, keepdim=True)
        pos = (lengths - 1 - torch.arange(L, device=items.device).unsqueeze(0)).clamp(0, self.pos.num_embeddings - 1)
        k = self.key(items + self.pos(pos))
        logits = (k @ self.query) / math.sqrt(items.shape[-1])
        logits = logits.masked_fill(~mask, -1e4)
        w = torch.softmax(logits, dim=1) * mask.to(items.dtype)
        att = (w.unsqueeze(-1) * items).sum(1)
        return 0.5 * (att + mean)
