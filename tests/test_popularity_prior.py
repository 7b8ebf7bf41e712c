"""The popularity prior: offsets in the model, selection on validation, checkpoints, full ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from towers.checkpoint import load_towers, save_towers
from towers.eval_data import EvalQueries
from towers.evaluate import all_vectors, user_vectors
from towers.full_ranking import topk_excluding, topk_per_bias
from towers.popularity_prior import select_prior
from towers.shapes import TowerShape
from towers.two_tower import TwoTowerModel

N_USERS, N_PRODUCTS = 40, 30


def _model(seed: int = 0) -> TwoTowerModel:
    torch.manual_seed(seed)
    shape = TowerShape(n_users=N_USERS, n_products=N_PRODUCTS, n_sellers=1, n_categories=1, n_brands=1,
                       n_product_features=0, n_seller_features=0, dim=8, temperature=0.1)
    return TwoTowerModel(shape).eval()


def _csr(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return indptr, np.array([x for r in rows for x in r], np.int64)


def _queries(targets: list[list[int]], exclude: list[list[int]] | None = None) -> EvalQueries:
    U = len(targets)
    rng = np.random.default_rng(1)
    hist = rng.integers(1, N_PRODUCTS, size=(U, 4)).astype(np.int64)
    return EvalQueries(
        user_idx=np.arange(1, U + 1, dtype=np.int64), hist_products=hist, hist_sellers=np.zeros_like(hist),
        hour=np.full(U, -1, np.int64), dow=np.full(U, -1, np.int64), targets=_csr(targets),
        seller_targets=_csr([[] for _ in range(U)]), exclude=_csr(exclude or [[] for _ in range(U)]),
    )


def _logq(popular: int) -> torch.Tensor:
    logq = torch.full((N_PRODUCTS,), -10.0)
    logq[popular] = -1.0
    return logq


def test_offsets_are_temperature_times_prior_times_relative_log_popularity() -> None:
    m = _model()
    m.set_popularity(_logq(7))
    ids = torch.arange(N_PRODUCTS)
    assert torch.equal(m.product_offsets(ids), torch.zeros(N_PRODUCTS))  # prior 0: the cosine alone
    m.set_popularity_prior(0.5)
    off = m.product_offsets(ids)
    assert off[7] == 0 and torch.allclose(off[ids != 7], torch.full((N_PRODUCTS - 1,), 0.1 * 0.5 * -9.0))
    assert torch.allclose(m.product_offsets(ids, 1.0), 2 * off)


def test_selection_picks_the_prior_the_validation_targets_reward() -> None:
    m = _model()
    m.set_popularity(_logq(7))
    U = 25
    # Everyone's target is the popular product 7: a strong enough prior puts it first for every user.
    # (offsets 0.1 * w * -9 for the others: below -2, any cosine gap, from w = 3)
    weight, table = select_prior(m, _queries([[7]] * U), (5.0, 0.0, 3.0), k=1)
    assert weight == 3.0  # ties (3 and 5 both reach recall 1) go to the smaller weight
    assert table["3.0"]["recall@1"] == 1.0 and table["5.0"]["recall@1"] == 1.0 and table["0.0"]["recall@1"] < 1.0
    # Each user's target is its own top product by cosine: any prior can only hurt.
    q = _queries([[0]] * U)
    with torch.no_grad():
        top, _ = topk_excluding(user_vectors(m, q), all_vectors(m.product_vectors, N_PRODUCTS), None, 1)
    best = [[int(t)] for t in top[:, 0]]
    assert any(b != [7] for b in best)
    weight, table = select_prior(m, _queries(best), (0.0, 3.0), k=1)
    assert weight == 0.0 and table["0.0"]["recall@1"] == 1.0 and table["3.0"]["recall@1"] < 1.0


def test_selection_with_one_weight_or_a_bad_grid() -> None:
    m = _model()
    assert select_prior(m, _queries([[7]] * 3), (0.3,), k=1) == (0.3, {})
    with pytest.raises(ValueError, match="popularity_prior_grid"):
        select_prior(m, _queries([[7]] * 3), (-0.1, 0.0), k=1)


def test_topk_per_bias_equals_one_call_per_bias() -> None:
    m = _model()
    q = _queries([[1]] * 9, exclude=[[2, 3]] * 9)
    with torch.no_grad():
        u, p = user_vectors(m, q), all_vectors(m.product_vectors, N_PRODUCTS)
    biases = torch.stack([torch.zeros(N_PRODUCTS), torch.linspace(-1, 0, N_PRODUCTS)])
    got = topk_per_bias(u, p, q.exclude, 5, biases, batch_size=4)
    for g in range(2):
        want, _ = topk_excluding(u, p, q.exclude, 5, batch_size=4, item_bias=biases[g])
        assert np.array_equal(got[g], want)
    assert not np.isin(got, [0, 2, 3]).any()


def test_checkpoint_keeps_the_prior_and_loads_models_saved_without_it(tmp_path) -> None:
    m = _model()
    m.set_popularity(_logq(7))
    m.set_popularity_prior(0.2)
    save_towers(m, tmp_path / "new", {})
    back, _ = load_towers(tmp_path / "new")
    assert float(back.popularity_prior) == pytest.approx(0.2)
    assert torch.equal(back.product_offsets(torch.arange(N_PRODUCTS)), m.product_offsets(torch.arange(N_PRODUCTS)))
    # A model saved before the prior existed: no buffers, so it scores by the cosine alone.
    save_towers(m, tmp_path / "old", {})
    state = torch.load(tmp_path / "old" / "towers.pt", weights_only=True)
    del state["log_popularity"], state["popularity_prior"]
    torch.save(state, tmp_path / "old" / "towers.pt")
    old, _ = load_towers(tmp_path / "old")
    assert torch.equal(old.product_offsets(torch.arange(N_PRODUCTS)), torch.zeros(N_PRODUCTS))
    state["unexpected.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "old" / "towers.pt")
    with pytest.raises(RuntimeError, match="unexpected"):
        load_towers(tmp_path / "old")


def test_item_bias_enters_the_loss_the_offsets_and_training() -> None:
    """model.item_bias: the loss's logits are cos/T + b (plus the logQ correction), and the offsets
    that evaluation and the index use are T * (b + prior * log_popularity)."""
    from recsys.config import Config, to_dict
    from towers.lit_module import TwoTowerLightning

    shape = TowerShape(n_users=10, n_products=N_PRODUCTS, n_sellers=1, n_categories=1, n_brands=1,
                       n_product_features=0, n_seller_features=0, dim=8, item_bias=True, use_user_id=False)
    train = {**to_dict(Config().train), "num_negatives": 0, "logq_correction": False, "history_dropout": 0.0}
    torch.manual_seed(0)
    lit = TwoTowerLightning(shape.to_dict(), train, {}).eval()
    m = lit.model
    with torch.no_grad():
        m.products.bias_emb.weight.copy_(torch.randn(N_PRODUCTS, 1))
    batch = {"user_idx": torch.tensor([1, 2, 3]), "product_idx": torch.tensor([5, 6, 9]),
             "seller_idx": torch.zeros(3, dtype=torch.long), "weight": torch.ones(3),
             "hist_products": torch.tensor([[4, 0], [1, 2], [3, 7]]), "hist_sellers": torch.zeros(3, 2, dtype=torch.long),
             "hour": torch.full((3,), -1), "dow": torch.full((3,), -1)}
    loss, _ = lit.compute_loss(batch)
    with torch.no_grad():
        u, p = m.user_vectors(batch), m.product_vectors(batch["product_idx"])
        b = m.products.bias_emb.weight[batch["product_idx"], 0]
        want = torch.nn.functional.cross_entropy(u @ p.T / m.temperature + b.unsqueeze(0), torch.arange(3))
        assert torch.allclose(loss, want, atol=1e-5)
        ids = torch.arange(N_PRODUCTS)
        m.set_popularity(_logq(7))
        m.set_popularity_prior(0.5)
        want_off = m.temperature * (m.products.bias_emb.weight[:, 0] + 0.5 * m.log_popularity)
        assert torch.allclose(m.product_offsets(ids), want_off)
    # the bias trains: a sparse gradient on the batch's products only
    loss.backward()
    assert m.products.bias_emb.weight.grad is not None
    assert set(m.products.bias_emb.weight.grad.coalesce().indices()[0].tolist()) == {5, 6, 9}
