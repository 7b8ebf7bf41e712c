"""The two-tower model: user, product and seller towers projected into one normalised space."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from towers.embeddings import embedding
from towers.product_tower import ProductTower
from towers.seller_tower import SellerTower
from towers.shapes import TowerShape
from towers.user_tower import UserTower


class TwoTowerModel(nn.Module):
    """User, product and seller towers sharing one d-dimensional space.

    The score of a (user, product) pair is ``cos(u, p) / temperature + b_p + prior * log_popularity_p``,
    where ``b_p`` is a learned bias (``item_bias``; else 0) and ``prior`` is 0 while training and then
    chosen on the validation split (:mod:`towers.popularity_prior`); sellers score ``cos(u, s) / temperature``. The FAISS indexes use
    the inner product of the same L2-normalised vectors, the product vectors extended by one
    dimension holding :meth:`product_offsets` (and queries by a 1), so ranking by index score equals
    ranking by model score.
    """

    def __init__(
        self,
        shape: TowerShape,
        product_cats: torch.Tensor | None = None,
        product_num: torch.Tensor | None = None,
        seller_num: torch.Tensor | None = None,
    ):
        super().__init__()
        self.shape = shape
        self.products = ProductTower(shape, product_cats, product_num)
        self.sellers = SellerTower(shape, seller_num)
        if shape.separate_history:
            hist_p = embedding(shape.n_products, shape.dim, shape.sparse)
            hist_s = embedding(shape.n_sellers, shape.dim, shape.sparse) if shape.has_sellers else None
        else:
            hist_p, hist_s = self.products.id_emb, self.sellers.id_emb if shape.has_sellers else None
        self.users = UserTower(shape, hist_p, hist_s)
        log_t = torch.tensor(math.log(shape.temperature))
        # log training frequency of each product minus the largest (<= 0), and the weight given to
        # it at scoring time: buffers, so the state dict alone carries both to serving.
        self.register_buffer("log_popularity", torch.zeros(shape.n_products))
        self.register_buffer("popularity_prior", torch.zeros(()))
        if shape.learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(0.01, 1.0)

    def user_vectors(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Args: batch with user_idx [B], hist_products/hist_sellers [B, L], hour/dow [B]. Returns [B, d] unit vectors."""
        u = self.users(
            batch["user_idx"],
            batch["hist_products"],
            batch.get("hist_sellers"),
            batch.get("hour"),
            batch.get("dow"),
        )
        return F.normalize(u, dim=-1)

    def product_vectors(self, product_idx: torch.Tensor) -> torch.Tensor:
        """Args: product_idx [...]. Returns [..., d] unit vectors."""
        return F.normalize(self.products(product_idx), dim=-1)

    def set_popularity(self, logq: torch.Tensor) -> None:
        """Store the products' log training frequencies. Args: logq: [N] float."""
        with torch.no_grad():
            self.log_popularity.copy_(logq - logq.max())

    def set_popularity_prior(self, prior: float) -> None:
        """Set the weight of ``log_popularity`` in the score (0 = cosine only)."""
        with torch.no_grad():
            self.popularity_prior.fill_(float(prior))

    def product_offsets(self, product_idx: torch.Tensor, prior: float | torch.Tensor | None = None) -> torch.Tensor:
        """What ranking by ``cos(u, p) + offset_p`` needs to equal ranking by the model score.

        Args:
            product_idx: [...] int64.
            prior: the popularity weight to use instead of the stored one (selection tries several).
        Returns:
            [...] float, ``temperature * (b_p + prior * log_popularity_p)`` (``b_p`` the learned bias
            with ``item_bias``, else 0; zeros without both).
        """
        w = self.popularity_prior if prior is None else prior
        return self.temperature * (self.products.bias(product_idx) + w * self.log_popularity[product_idx])

    def seller_vectors(self, seller_idx: torch.Tensor) -> torch.Tensor:
        """Args: seller_idx [...]. Returns [..., d] unit vectors."""
        return F.normalize(self.sellers(seller_idx), dim=-1)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [m.weight for m in self.modules() if isinstance(m, nn.Embedding) and m.sparse]

    def dense_parameters(self) -> list[nn.Parameter]:
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse and p.requires_grad]
