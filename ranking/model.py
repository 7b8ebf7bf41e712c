"""The ranker: a DCN-v2 cross network plus an MLP over (user, product, offer/seller) triples.

Plain ``nn.Module`` (no Lightning), shared by training (``ranking.lit_module``) and serving
(``ranking.scorer``). Input per candidate row, assembled in :meth:`RankerModel.features`:

* the two-tower user vector and the user's pooled history (mean of the frozen two-tower product and
  seller vectors of their recent events), the candidate's product and seller vectors, each through
  one shared trainable projection to ``proj_dim`` (the tables themselves stay frozen);
* similarities u·p, u·s, history·p, history·s, p·s, and history matches (how often the user met this
  product, the share of their history with this seller / top-level category / leaf category);
* product numeric features and categorical embeddings (3 category levels, brand), seller numeric
  features, user features, offer features and candidate features (see ``ranking.features``);
* time context (hour, day of week) embeddings.

The two-tower tables and catalog features are frozen buffers (saved with the weights, so a ranker
directory is self-contained). ``cross_rank`` > 0 uses the low-rank cross layer of DCN-v2.
``retrieval_prior`` > 0 makes the ranker residual: it starts from the towers' logit (retrieval order)
and learns what to change, which matters when the val period gives only a few hundred lists.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ranking.features import CANDIDATE_FEATURES, MODEL_FEATURES, OFFER_FEATURES, USER_FEATURES


@dataclass(frozen=True)
class RankerShape:
    """Sizes and switches of the ranker (what a checkpoint needs to rebuild it)."""

    n_products: int
    n_sellers: int
    n_categories: int
    n_brands: int
    dim: int  # two-tower vector size
    n_product_features: int
    n_seller_features: int
    n_user_features: int = len(USER_FEATURES)
    n_offer_features: int = len(OFFER_FEATURES)
    n_candidate_features: int = len(CANDIDATE_FEATURES)
    cat_dim: int = 8
    proj_dim: int = 16  # trainable projection of the frozen 64-d two-tower vectors (0 = feed them as they are)
    cross_layers: int = 3
    cross_rank: int = 0  # 0 = full-rank cross matrices
    hidden: tuple[int, ...] = (256, 128)
    dropout: float = 0.1
    # > 0: the logit is ``retrieval_prior * retrieval_score + network(x)`` with the network's output
    # layer starting at zero, so an untrained ranker keeps retrieval's order and training learns a
    # correction (the prior stays learnable). Set to 1 / model.temperature: the towers' own logit.
    retrieval_prior: float = 0.0

    @property
    def n_cand_num(self) -> int:
        return self.n_offer_features + self.n_candidate_features

    @property
    def vec_dim(self) -> int:
        return self.proj_dim if self.proj_dim > 0 else self.dim

    @property
    def input_dim(self) -> int:
        return (
            5 * self.vec_dim
            + len(MODEL_FEATURES)
            + self.n_product_features
            + self.n_seller_features
            + self.n_user_features
            + self.n_cand_num
            + 6 * self.cat_dim
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @staticmethod
    def from_dict(d: dict) -> RankerShape:
        d = dict(d)
        d["hidden"] = tuple(int(h) for h in d.get("hidden", ()))
        return RankerShape(**d)


class CrossLayer(nn.Module):
    """DCN-v2 cross layer: ``x_{l+1} = x0 * (W x_l + b) + x_l`` (W full or ``U V^T`` of rank r)."""

    def __init__(self, dim: int, rank: int = 0):
        super().__init__()
        if rank and rank < dim:
            self.v = nn.Linear(dim, rank, bias=False)
            self.u = nn.Linear(rank, dim)
            nn.init.normal_(self.v.weight, std=1.0 / math.sqrt(dim))
            nn.init.normal_(self.u.weight, std=1.0 / math.sqrt(rank))
            nn.init.zeros_(self.u.bias)
            self.w = None
        else:
            self.w = nn.Linear(dim, dim)
            nn.init.normal_(self.w.weight, std=1.0 / math.sqrt(dim))
            nn.init.zeros_(self.w.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.w(x) if self.w is not None else self.u(self.v(x))
        return x0 * h + x


class RankerModel(nn.Module):
    """Scores candidate rows; see the module docstring for the inputs.

    Batch (dict of tensors), B lists of C candidates, history width L:
        user_vec [B, d] float, hist_products / hist_sellers [B, L] int64 (0-padded),
        user_num [B, n_user_features], hour / dow [B] int64 (-1 unknown),
        product_idx / seller_idx [B, C] int64, cand_num [B, C, n_offer + n_candidate features].

    ``forward`` returns logits [B, C] (higher = better).
    """

    def __init__(self, shape: RankerShape):
        super().__init__()
        self.shape = shape
        s = shape
        self.register_buffer("product_vecs", torch.zeros(s.n_products, s.dim))
        self.register_buffer("seller_vecs", torch.zeros(s.n_sellers, s.dim))
        self.register_buffer("product_cats", torch.zeros(s.n_products, 4, dtype=torch.long))
        self.register_buffer("product_num", torch.zeros(s.n_products, s.n_product_features))
        self.register_buffer("seller_num", torch.zeros(s.n_sellers, s.n_seller_features))
        self.cat_emb = nn.Embedding(max(s.n_categories, 1), s.cat_dim)
        self.brand_emb = nn.Embedding(max(s.n_brands, 1), s.cat_dim)
        self.hour_emb = nn.Embedding(25, s.cat_dim)
        self.dow_emb = nn.Embedding(8, s.cat_dim)
        for e in (self.cat_emb, self.brand_emb, self.hour_emb, self.dow_emb):
            nn.init.normal_(e.weight, std=0.05)
        self.vec_proj = nn.Linear(s.dim, s.proj_dim, bias=False) if s.proj_dim > 0 else None
        D = s.input_dim
        self.input_norm = nn.LayerNorm(D)
        self.cross = nn.ModuleList([CrossLayer(D, s.cross_rank) for _ in range(s.cross_layers)])
        layers: list[nn.Module] = []
        prev = D
        for h in s.hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(), nn.Dropout(s.dropout)]
            prev = h
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(prev, 1)
        self.prior = None
        if s.retrieval_prior > 0:
            self.prior = nn.Parameter(torch.tensor(float(s.retrieval_prior)))
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    # ------------------------------------------------------------------------------------ tables

    @torch.no_grad()
    def set_tables(
        self,
        product_vecs: torch.Tensor,
        seller_vecs: torch.Tensor,
        product_cats: torch.Tensor,
        product_num: torch.Tensor,
        seller_num: torch.Tensor,
    ) -> None:
        """Copy the frozen two-tower vectors and catalog features into the buffers."""
        self.product_vecs.copy_(product_vecs)
        self.seller_vecs.copy_(seller_vecs)
        self.product_cats.copy_(product_cats)
        self.product_num.copy_(product_num)
        self.seller_num.copy_(seller_num)

    # ------------------------------------------------------------------------------------ forward

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The input rows [B, C, input_dim]."""
        pid = batch["product_idx"].clamp(0, self.shape.n_products - 1)
        sid = batch["seller_idx"].clamp(0, self.shape.n_sellers - 1)
        B, C = pid.shape
        hp = batch["hist_products"].clamp(0, self.shape.n_products - 1)
        hs = batch["hist_sellers"].clamp(0, self.shape.n_sellers - 1)
        hmask = hp > 0
        n_hist = hmask.sum(1, keepdim=True).clamp_min(1).to(self.product_vecs.dtype)  # [B, 1]
        u = batch["user_vec"].to(self.product_vecs.dtype)
        hpv = (self.product_vecs[hp] * hmask.unsqueeze(-1)).sum(1) / n_hist
        smask = hmask & (hs > 0)
        hsv = (self.seller_vecs[hs] * smask.unsqueeze(-1)).sum(1) / smask.sum(1, keepdim=True).clamp_min(1)
        p = self.product_vecs[pid]  # [B, C, d]
        s = self.seller_vecs[sid] * (sid > 0).unsqueeze(-1)
        # u.p, history.p | u.s, history.s | p.s
        sims = torch.cat(
            [
                torch.bmm(p, torch.stack([u, hpv], 2)),
                torch.bmm(s, torch.stack([u, hsv], 2)),
                (p * s).sum(-1, keepdim=True),
            ],
            -1,
        )
        # history matches: [B, C, L] comparisons (L and C are small)
        same_p = (hp.unsqueeze(1) == pid.unsqueeze(2)) & hmask.unsqueeze(1)
        same_s = (hs.unsqueeze(1) == sid.unsqueeze(2)) & smask.unsqueeze(1) & (sid > 0).unsqueeze(2)
        ccat = self.product_cats[pid]  # [B, C, 4]
        hcat = self.product_cats[hp]  # [B, L, 4]
        same_c1 = (hcat[:, :, 0].unsqueeze(1) == ccat[:, :, 0].unsqueeze(2)) & hmask.unsqueeze(1) & (ccat[:, :, 0] > 0).unsqueeze(2)
        same_c3 = (hcat[:, :, 2].unsqueeze(1) == ccat[:, :, 2].unsqueeze(2)) & hmask.unsqueeze(1) & (ccat[:, :, 2] > 0).unsqueeze(2)
        n_h = n_hist.unsqueeze(1)  # [B, 1, 1]
        match = torch.stack(
            [
                torch.log1p(same_p.sum(-1).to(p.dtype)),
                same_s.sum(-1).to(p.dtype) / n_h.squeeze(-1),
                same_c1.sum(-1).to(p.dtype) / n_h.squeeze(-1),
                same_c3.sum(-1).to(p.dtype) / n_h.squeeze(-1),
            ],
            -1,
        )
        ncat = self.cat_emb.num_embeddings
        cat_e = self.cat_emb(ccat[:, :, :3].clamp(0, ncat - 1)).reshape(B, C, 3 * self.shape.cat_dim)
        brand_e = self.brand_emb(ccat[:, :, 3].clamp(0, self.brand_emb.num_embeddings - 1))
        hour = (batch["hour"].long() + 1).clamp(0, 24)
        dow = (batch["dow"].long() + 1).clamp(0, 7)
        ctx = torch.cat([self.hour_emb(hour), self.dow_emb(dow)], -1)  # [B, 2 * cat_dim]

        def per_user(x: torch.Tensor) -> torch.Tensor:
            return x.unsqueeze(1).expand(B, C, x.shape[-1])

        if self.vec_proj is not None:
            users = self.vec_proj(torch.cat([u, hpv, hsv], -1).reshape(B, 3, -1)).reshape(B, -1)
            items = self.vec_proj(torch.stack([p, s], 2)).reshape(B, C, -1)
        else:
            users = torch.cat([u, hpv, hsv], -1)
            items = torch.cat([p, s], -1)
        return torch.cat(
            [
                per_user(users), items, sims, match,
                self.product_num[pid], self.seller_num[sid],
                per_user(batch["user_num"].to(p.dtype)), batch["cand_num"].to(p.dtype),
                cat_e, brand_e, per_user(ctx),
            ],
            -1,
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x0 = self.input_norm(self.features(batch))
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        logits = self.out(self.mlp(x)).squeeze(-1)
        if self.prior is not None:
            score = batch["cand_num"][..., self.shape.n_offer_features + CANDIDATE_FEATURES.index("retrieval_score")]
            logits = logits + self.prior * score.to(logits.dtype)
        return logits
