"""Co-occurrence neighbours and the product tower's item-side smoothing."""

from __future__ import annotations

import numpy as np
import torch

from towers.item_neighbors import cooccurrence_neighbors, pair_cap
from towers.shapes import TowerShape
from towers.two_tower import TwoTowerModel


def test_neighbours_known_answer() -> None:
    # users: 1 -> {1, 2, 3}, 2 -> {1, 2}, 3 -> {2, 3}, 4 -> {4}; product 5 unseen
    user = np.array([1, 1, 1, 2, 2, 3, 3, 4, 0, 1])
    prod = np.array([1, 2, 3, 1, 2, 2, 3, 4, 3, 0])  # the last two rows have an unknown id: ignored
    got = cooccurrence_neighbors(np.r_[user, 1], np.r_[prod, 1], n_products=6, k=2)  # a repeat counts once
    # degrees n1=2, n2=3, n3=2; c12=2, c13=1, c23=2 -> s12=s23=2/sqrt(6)=0.816, s13=1/2
    assert got.tolist() == [[0, 0], [2, 3], [1, 3], [2, 1], [0, 0], [0, 0]]
    assert cooccurrence_neighbors(user, prod, 6, 1).tolist() == [[0], [2], [1], [2], [0], [0]]  # tie 2-1/2-3: lower index


def test_pair_cap_fits_the_budget() -> None:
    n = np.array([1, 5, 100, 300])
    assert pair_cap(n, 200, 10**9) == 200
    c = pair_cap(n, 200, 5000)
    assert (np.minimum(n, c) ** 2).sum() <= 5000 < (np.minimum(n, c + 1) ** 2).sum()


def test_capped_users_are_a_seeded_subset() -> None:
    rng = np.random.default_rng(0)
    user = np.repeat(np.arange(1, 41), 30)
    prod = rng.integers(1, 200, len(user))
    a = cooccurrence_neighbors(user, prod, 200, 5, max_items_per_user=10, seed=1)
    assert np.array_equal(a, cooccurrence_neighbors(user, prod, 200, 5, max_items_per_user=10, seed=1))
    assert not np.array_equal(a, cooccurrence_neighbors(user, prod, 200, 5, max_items_per_user=10, seed=2))
    assert not np.array_equal(a, cooccurrence_neighbors(user, prod, 200, 5, max_items_per_user=30, seed=1))
    for block in (1, 500):  # scoring products in blocks (one product at a time, a few) changes nothing
        assert np.array_equal(a, cooccurrence_neighbors(user, prod, 200, 5, max_items_per_user=10, seed=1, block_pairs=block))


def test_product_vector_adds_the_neighbours_mean_and_survives_save(tmp_path) -> None:
    from towers.checkpoint import load_towers, save_towers

    shape = TowerShape(n_users=3, n_products=6, n_sellers=1, n_categories=1, n_brands=1, n_product_features=0,
                       n_seller_features=0, dim=4, item_neighbors=2)
    torch.manual_seed(0)
    model = TwoTowerModel(shape).eval()
    model.products.set_neighbors(torch.tensor([[0, 0], [2, 3], [1, 0], [0, 0], [0, 0], [0, 0]]))
    e = model.products.id_emb.weight.detach()
    got = model.products(torch.tensor([[1, 2], [4, 0]])).detach()
    want = torch.stack([torch.stack([e[1] + (e[2] + e[3]) / 2, e[2] + e[1]]), torch.stack([e[4], e[0]])])
    assert torch.allclose(got, want, atol=1e-6)
    save_towers(model, tmp_path / "m", {})
    loaded, _ = load_towers(tmp_path / "m")
    assert torch.equal(loaded.products.neighbors, model.products.neighbors)
    assert torch.allclose(loaded.product_vectors(torch.arange(6)), model.product_vectors(torch.arange(6)))
