"""Embedding tables shared by the towers (sparse gradients for a sparse-aware optimizer)."""

from __future__ import annotations

import torch
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
