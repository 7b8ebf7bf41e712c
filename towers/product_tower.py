"""Product tower: product id plus whatever catalog features the data has."""

from __future__ import annotations

import torch
from torch import nn

from towers.embeddings import embedding, ragged_mean
from towers.shapes import TowerShape


class ProductTower(nn.Module):
    """Maps product indexes to d-dimensional vectors (not yet normalised).

    The catalog features are stored as buffers (``cats`` [N, 4]: category levels 1-3 and brand,
    ``num`` [N, F]: scaled numeric features), so the state dict alone rebuilds the tower at serving
    time. With id-only data the feature part is skipped.

    With ``item_neighbors`` = K > 0, ``neighbors`` [N, K] (a buffer, 0-padded; see
    :mod:`towers.item_neighbors`) lists each product's co-occurrence neighbours, and the mean of
    their id embeddings is added to the product's own.
    """

    def __init__(self, shape: TowerShape, cats: torch.Tensor | None = None, num: torch.Tensor | None = None):
        super().__init__()
        d = shape.dim
        self.shape = shape
        self.id_emb = embedding(shape.n_products, d, shape.sparse)
        self.use_features = shape.use_features and (shape.n_categories > 1 or shape.n_brands > 1 or shape.n_product_features > 0)
        n = shape.n_products
        self.register_buffer("cats", cats.long() if cats is not None else torch.zeros(n, 4, dtype=torch.long))
        self.register_buffer(
            "num", num.float() if num is not None else torch.zeros(n, shape.n_product_features)
        )
        if shape.item_neighbors > 0:
            self.register_buffer("neighbors", torch.zeros(n, shape.item_neighbors, dtype=torch.int32))
        if self.use_features:
            self.cat_emb = embedding(shape.n_categories, d, shape.sparse, std=0.02)
            self.brand_emb = embedding(shape.n_brands, d, shape.sparse, std=0.02)
            self.num_proj = nn.Linear(max(shape.n_product_features, 1), d)
            self.mix = nn.Sequential(nn.Linear(d, shape.hidden), nn.GELU(), nn.Linear(shape.hidden, d))
        if shape.item_bias:
            # Starts at zero: the logQ-corrected softmax then learns only what the cosine cannot say.
            self.bias_emb = embedding(shape.n_products, 1, shape.sparse, std=0.0)

    def forward(self, product_idx: torch.Tensor) -> torch.Tensor:
        """Args: product_idx: [...] int64. Returns: [..., d] float."""
        x = self.id_emb(product_idx)
        if self.shape.item_neighbors > 0:
            nb = self.neighbors[product_idx.reshape(-1)].long()
            x = x + ragged_mean(self.id_emb, nb, nb > 0).reshape(x.shape)
        if self.use_features:
            c = self.cats[product_idx]
            f = self.cat_emb(c[..., 0]) + self.cat_emb(c[..., 1]) + self.cat_emb(c[..., 2]) + self.brand_emb(c[..., 3])
            if self.num.shape[-1] > 0:
                f = f + self.num_proj(self.num[product_idx])
            x = x + self.mix(f)
        return x

    def bias(self, product_idx: torch.Tensor) -> torch.Tensor:
        """Args: product_idx: [...] int64. Returns: [...] float logit bias (zeros without ``item_bias``)."""
        if not self.shape.item_bias:
            return torch.zeros(product_idx.shape, device=product_idx.device)
        return self.bias_emb(product_idx).squeeze(-1)

    def set_neighbors(self, neighbors: torch.Tensor) -> None:
        """Copy the co-occurrence neighbours in. Args: neighbors: [N, K] int, 0-padded."""
        with torch.no_grad():
            self.neighbors.copy_(neighbors.to(self.neighbors.dtype))
