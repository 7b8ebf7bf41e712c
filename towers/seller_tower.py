"""Seller tower: seller id plus seller features (rating, catalog size, sales, price level, age)."""

from __future__ import annotations

import torch
from torch import nn

from towers.embeddings import embedding
from towers.shapes import TowerShape


class SellerTower(nn.Module):
    """Maps seller indexes to d-dimensional vectors (not yet normalised)."""

    def __init__(self, shape: TowerShape, num: torch.Tensor | None = None):
        super().__init__()
        d = shape.dim
        self.id_emb = embedding(shape.n_sellers, d, shape.sparse)
        self.register_buffer("num", num.float() if num is not None else torch.zeros(shape.n_sellers, shape.n_seller_features))
        self.use_features = shape.use_features and shape.n_seller_features > 0
        if self.use_features:
            self.mix = nn.Sequential(nn.Linear(shape.n_seller_features, shape.hidden), nn.GELU(), nn.Linear(shape.hidden, d))

    def forward(self, seller_idx: torch.Tensor) -> torch.Tensor:
        """Args: seller_idx: [...] int64. Returns: [..., d] float."""
        x = self.id_emb(seller_idx)
        if self.use_features:
            x = x + self.mix(self.num[seller_idx])
        return x
