"""Pooling of a user's recent products and sellers into one vector: mean, recency-weighted mean or attention."""

from __future__ import annotations

import math

import torch
from torch import nn

from towers.embeddings import masked_mean

POOLINGS = ("mean", "recency", "short_long", "attention")


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
    ``short_long``: two recency profiles, one starting as the mean (long-term interest) and one as a
    steep decay over the latest items (short-term); the user tower concatenates both pooled vectors,
    so each output dimension can mix the two horizons differently.
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
        if pooling == "short_long":
            decay = -torch.arange(max_len, dtype=torch.float32) / 2.0  # weight halves about every 1.4 items
            self.log_recency = nn.Parameter(torch.stack([torch.zeros(max_len), decay.clamp_min(-20.0)]))
        if pooling == "attention":
            self.query = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
            self.key = nn.Linear(dim, dim, bias=False)
            self.pos = nn.Embedding(max_len, dim)
            nn.init.normal_(self.pos.weight, std=0.01)

    @property
    def n_profiles(self) -> int:
        """How many pooled vectors the encoder returns side by side (2 for ``short_long``)."""
        return 2 if self.pooling == "short_long" else 1

    def recency_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """The recency poolings' weight of each entry, per profile: [n_profiles, B, L] float, 0 where
        ``mask`` is false (``recency``: one profile; ``short_long``: long-term, then short-term).

        Args:
            mask: [B, L] bool, the kept history entries.
        """
        log_w = self.log_recency.reshape(self.n_profiles, -1)
        w = log_w.exp()[:, recency_positions(mask, log_w.shape[1] - 1)]
        return w * mask.to(w.dtype)

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Args: items [B, L, d], mask [B, L] bool. Returns [B, n_profiles * d]."""
        if self.pooling in ("recency", "short_long"):
            out = [(w.unsqueeze(-1) * items).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-12)
                   for w in self.recency_weights(mask)]
            return torch.cat(out, dim=-1)
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
