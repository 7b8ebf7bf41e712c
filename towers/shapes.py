"""Model shapes as frozen typed dataclasses (what a checkpoint needs to rebuild the towers)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TowerShape:
    """Sizes and switches of the three towers.

    Table sizes include the reserved index 0 (unknown / padding).
    """

    n_users: int
    n_products: int
    n_sellers: int
    n_categories: int
    n_brands: int
    n_product_features: int
    n_seller_features: int
    dim: int = 64
    hidden: int = 128
    history_pooling: str = "mean"
    use_user_id: bool = True
    separate_history: bool = False
    item_neighbors: int = 0
    item_bias: bool = False
    user_hash_buckets: int = 0
    use_features: bool = True
    sparse: bool = True
    dropout: float = 0.1
    temperature: float = 0.1
    learn_temperature: bool = False

    @property
    def has_sellers(self) -> bool:
        return self.n_sellers > 2

    def to_dict(self) -> dict:
        return asdict(self)
