"""The ranker model and losses, and a planted dataset where an offer feature decides the label."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ranking.data import ListData
from ranking.features import CANDIDATE_FEATURES, OFFER_FEATURES, USER_FEATURES, candidate_features
from ranking.losses import listwise_loss, pointwise_loss, ranking_loss
from ranking.model import RankerModel, RankerShape
from recsys.config import load_config

SHAPE = RankerShape(n_products=30, n_sellers=6, n_categories=5, n_brands=3, dim=8, n_product_features=2,
                    n_seller_features=1, hidden=(16, 8), cross_layers=2)


def _tables(shape: RankerShape, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pv = torch.nn.functional.normalize(torch.randn(shape.n_products, shape.dim, generator=g), dim=-1)
    sv = torch.nn.functional.normalize(torch.randn(shape.n_sellers, shape.dim, generator=g), dim=-1)
    cats = torch.randint(0, shape.n_categories, (shape.n_products, 4), generator=g)
    cats[:, 3] = cats[:, 3] % shape.n_brands
    return {"product_vecs": pv, "seller_vecs": sv, "product_cats": cats,
            "product_num": torch.rand(shape.n_products, shape.n_product_features, generator=g),
            "seller_num": torch.rand(shape.n_sellers, shape.n_seller_features, generator=g)}


def _batch(B: int, C: int, L: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "user_vec": torch.nn.functional.normalize(torch.randn(B, SHAPE.dim, generator=g), dim=-1),
        "hist_products": torch.randint(0, SHAPE.n_products, (B, L), generator=g),
        "hist_sellers": torch.randint(0, SHAPE.n_sellers, (B, L), generator=g),
        "user_num": torch.rand(B, len(USER_FEATURES), generator=g),
        "hour": torch.tensor([3, -1][:B] + [0] * max(0, B - 2)),
        "dow": torch.tensor([6, -1][:B] + [0] * max(0, B - 2)),
        "product_idx": torch.randint(1, SHAPE.n_products, (B, C), generator=g),
        "seller_idx": torch.randint(0, SHAPE.n_sellers, (B, C), generator=g),
        "cand_num": torch.rand(B, C, len(OFFER_FEATURES) + len(CANDIDATE_FEATURES), generator=g),
    }


def test_shapes_forward_frozen_tables_and_row_independence() -> None:
    torch.manual_seed(0)
    m = RankerModel(SHAPE)
    m.set_tables(**_tables(SHAPE))
    b = _batch(2, 5)
    assert m.features(b).shape == (2, 5, SHAPE.input_dim)
    out = m(b)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert m.cross[0].w.weight.grad is not None and m.out.weight.grad.abs().sum() > 0
    names = {n for n, _ in m.named_parameters()}
    assert "product_vecs" not in names and "product_vecs" in m.state_dict()  # frozen, but saved
    m.eval()
    with torch.no_grad():
        full = m(b)
        perm = torch.tensor([4, 2, 0, 1, 3])
        permuted = m({**b, **{k: b[k][:, perm] for k in ("product_idx", "seller_idx", "cand_num")}})
        alone = m({**b, **{k: b[k][:, 2:3] for k in ("product_idx", "seller_idx", "cand_num")}})
    assert torch.allclose(permuted, full[:, perm], atol=1e-5)
    assert torch.allclose(alone[:, 0], full[:, 2], atol=1e-5)  # a row's score ignores the other rows
    low = RankerShape.from_dict({**SHAPE.to_dict(), "cross_rank": 4})
    assert RankerModel(low)(b).shape == (2, 5) and RankerShape.from_dict(low.to_dict()) == low


def test_residual_ranker_starts_at_retrieval_order_and_learns_a_correction() -> None:
    """retrieval_prior > 0: before training the logit is prior * retrieval score, a change of the
    network moves it, and a shape saved without the field loads as a plain ranker."""
    torch.manual_seed(0)
    shape = RankerShape.from_dict({**SHAPE.to_dict(), "retrieval_prior": 10.0})
    m = RankerModel(shape)
    m.set_tables(**_tables(shape))
    b = _batch(3, 7)
    score = b["cand_num"][..., len(OFFER_FEATURES) + CANDIDATE_FEATURES.index("retrieval_score")]
    out = m(b)
    assert torch.allclose(out, 10.0 * score, atol=1e-6)
    out.sum().backward()
    assert m.prior.grad is not None and m.out.weight.grad.abs().sum() > 0
    with torch.no_grad():
        m.out.bias.fill_(0.5)
        assert torch.allclose(m(b), 10.0 * score + 0.5, atol=1e-5)
    old = {k: v for k, v in SHAPE.to_dict().items() if k != "retrieval_prior"}
    assert RankerShape.from_dict(old).retrieval_prior == 0.0 and RankerModel(RankerShape.from_dict(old)).prior is None


def test_listwise_loss_known_value() -> None:
    logits = torch.tensor([[0.0, math.log(2.0), 5.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # list 1: padding ignored, target (1/2, 1/2), softmax (1/3, 2/3); list 2 has no label: skipped
    want = -(0.5 * math.log(1 / 3) + 0.5 * math.log(2 / 3))
    assert listwise_loss(logits, labels, mask).item() == pytest.approx(want, abs=1e-6)
    graded = listwise_loss(torch.zeros(1, 3), torch.tensor([[1.0, 0.5, 0.0]]), torch.ones(1, 3, dtype=torch.bool))
    assert graded.item() == pytest.approx(math.log(3), abs=1e-6)  # uniform scores: cross-entropy = log 3
    assert listwise_loss(logits, torch.zeros(2, 3), mask).item() == 0.0


def test_pointwise_loss_known_value() -> None:
    logits = torch.tensor([[2.0, 0.0, 7.0]])
    labels = torch.tensor([[0.5, 0.0, 1.0]])
    mask = torch.tensor([[True, True, False]])
    bce1 = math.log(1 + math.exp(-2.0))  # positive (target 1) with weight 0.5
    bce2 = math.log(2.0)  # negative, weight 1
    want = (0.5 * bce1 + bce2) / 1.5
    assert pointwise_loss(logits, labels, mask).item() == pytest.approx(want, abs=1e-6)
    assert ranking_loss("pointwise", logits, labels, mask).item() == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="ranking.loss"):
        ranking_loss("pairwise", logits, labels, mask)


def planted_lists(n_lists: int, C: int, shape: RankerShape, seed: int) -> ListData:
    """Lists where the cheapest offers (low price vs category) are bought and retrieval order is random."""
    rng = np.random.default_rng(seed)
    price = rng.normal(0, 1, (n_lists, C)).astype(np.float32)
    offer = np.zeros((n_lists, C, len(OFFER_FEATURES)), np.float32)
    offer[:, :, OFFER_FEATURES.index("log_price_vs_category")] = price
    score = np.sort(rng.uniform(0, 1, (n_lists, C)).astype(np.float32), 1)[:, ::-1]
    rank = np.tile(np.arange(1, C + 1), (n_lists, 1))
    cand = candidate_features(score.ravel(), rank.ravel(), C).reshape(n_lists, C, -1)
    buy = price < -1.0
    label = np.where(buy, 1.0, np.where(price < -0.5, 0.2, 0.0)).astype(np.float32)
    return ListData(
        user_idx=np.arange(1, n_lists + 1), user_vec=rng.normal(0, 0.3, (n_lists, shape.dim)).astype(np.float32),
        hist_products=rng.integers(0, shape.n_products, (n_lists, 4)), hist_sellers=rng.integers(0, shape.n_sellers, (n_lists, 4)),
        user_num=rng.uniform(0, 1, (n_lists, len(USER_FEATURES))).astype(np.float32),
        hour=rng.integers(0, 24, n_lists), dow=rng.integers(0, 7, n_lists), n_targets=buy.sum(1),
        product_idx=rng.integers(1, shape.n_products, (n_lists, C)), seller_idx=rng.integers(1, shape.n_sellers, (n_lists, C)),
        cand_num=np.concatenate([offer, cand], 2), label=label, rank=rank, added=np.zeros((n_lists, C), bool),
        target=buy, mask=np.ones((n_lists, C), bool),
    )


@pytest.mark.parametrize(("loss", "prior"), [("listwise", 0.0), ("pointwise", 0.0), ("listwise", 10.0)])
def test_ranker_learns_planted_offer_signal_and_beats_retrieval_order(tmp_path, monkeypatch, loss, prior) -> None:
    """The planted signal contradicts nothing in retrieval order (random): a residual ranker, which
    starts at retrieval order, must learn to leave it as well."""
    from ranking import train
    from ranking.evaluate import evaluate_lists, score_lists
    from ranking.train import fit_lists

    monkeypatch.setattr(train, "MIN_STEPS_PER_EPOCH", 4)  # full 32-list batches: fewer steps, a faster test

    cfg = load_config(None, [f"ranking.loss={loss}", "ranking.epochs=4", "ranking.batch_size=32", "ranking.lr=0.01",
                             "ranking.hidden=[32, 16]", "ranking.cross_layers=2", "ranking.seed=3"])
    shape = RankerShape.from_dict({**SHAPE.to_dict(), "hidden": [32, 16], "retrieval_prior": prior})
    model, info = fit_lists(cfg, shape, _tables(shape), planted_lists(160, 16, shape, 0), tmp_path, 16, track=False)
    assert info["epochs_trained"] >= 1 and info["val_lists"] == 32
    test = planted_lists(120, 16, shape, 1)
    rep = evaluate_lists(score_lists(model, test), test, 16, samples=200, seed=0)
    ndcg = rep["all"]["ndcg@10"]
    assert ndcg["ranker"] > ndcg["retrieval"] + 0.2, ndcg
    assert ndcg["ci"]["lift"][0] > 0 and rep["all"]["mrr"]["lift"] > 0


def test_scorer_and_service_do_not_import_lightning() -> None:
    code = (
        "import sys\n"
        "import ranking.scorer, ranking.service, ranking.model, ranking.features, ranking.losses, ranking.metrics\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', 'pyspark'))\n"
        "print(','.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"serving path imports Lightning / Spark: {r.stdout} {r.stderr[-2000:]}"


def test_small_data_gets_smaller_batches() -> None:
    from ranking.train import lists_per_batch

    assert lists_per_batch(1000, 256) == 32  # at least 32 optimizer steps per epoch
    assert lists_per_batch(100_000, 256) == 256 and lists_per_batch(3, 256) == 1
