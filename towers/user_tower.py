"""User tower: user id (with an unknown/hashed fallback), history encoder and time context."""

from __future__ import annotations

import torch
from torch import nn

from towers.bit_dropout import BitDropout
from towers.embeddings import embedding, ragged_mean
from towers.history_encoder import HistoryEncoder
from towers.shapes import TowerShape


class UserTower(nn.Module):
    """Builds the user vector from id, recent products/sellers and context (not yet normalised).

    The history encoder reads the product and seller id tables that the product and seller towers
    own (passed in, shared), so a user unseen in training still gets a vector from their history.
    Unknown users use row 0 of the id table (trained through id dropout) or, with
    ``user_hash_buckets`` > 0, a hashed bucket row.
    """

    def __init__(self, shape: TowerShape, product_ids: nn.Embedding, seller_ids: nn.Embedding | None):
        super().__init__()
        d = shape.dim
        self.shape = shape
        self.use_user_id = shape.use_user_id
        if self.use_user_id:
            self.id_emb = embedding(shape.n_users + shape.user_hash_buckets, d, shape.sparse)
        self.product_ids = product_ids
        self.seller_ids = seller_ids
        self.history = HistoryEncoder(d, shape.history_pooling)
        k = self.history.n_profiles
        self.hist_proj = nn.Linear(k * d, d, bias=False)
        with torch.no_grad():  # starts as the average of the pooled vectors
            self.hist_proj.weight.copy_(torch.eye(d).repeat(1, k) / k)
        self.hour_emb = nn.Embedding(25, d)
        self.dow_emb = nn.Embedding(8, d)
        nn.init.zeros_(self.hour_emb.weight)
        nn.init.zeros_(self.dow_emb.weight)
        self.dropout = BitDropout(shape.dropout)

    def forward(
        self,
        user_idx: torch.Tensor,
        hist_products: torch.Tensor,
        hist_sellers: torch.Tensor | None = None,
        hour: torch.Tensor | None = None,
        dow: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            user_idx: [B] int64 (0 = unknown).
            hist_products: [B, L] int64, 0-padded.
            hist_sellers: [B, L] int64 aligned with hist_products, or None.
            hour, dow: [B] int64, -1 when unknown.
        Returns:
            [B, d] float.
        """
        mask = hist_products > 0
        use_sellers = self.seller_ids is not None and hist_sellers is not None
        if self.history.pooling in ("mean", "recency", "short_long"):
            # [P, B, L] recency weights of the P profiles (one lookup serves all), or None: the mean
            w = self.history.recency_weights(mask) if self.history.pooling != "mean" else None
            pooled = ragged_mean(self.product_ids, hist_products, mask, weights=w)
            if use_sellers:
                denom = mask.sum(1) if w is None else w.sum(-1)
                pooled = pooled + 0.5 * ragged_mean(self.seller_ids, hist_sellers, mask & (hist_sellers > 0), denom, w)
            if w is not None:
                pooled = torch.cat(list(pooled), dim=-1)
        else:
            items = self.product_ids(hist_products)
            if use_sellers:
                items = items + 0.5 * self.seller_ids(hist_sellers) * (hist_sellers > 0).unsqueeze(-1)
            pooled = self.history(items, mask)
        h = self.hist_proj(self.dropout(pooled))
        x = h
        if self.use_user_id:
            x = x + self.id_emb(user_idx)
        if hour is not None:
            x = x + self.hour_emb((hour + 1).clamp(0, 24)) + self.dow_emb((dow + 1).clamp(0, 7))
        return x
