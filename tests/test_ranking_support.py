"""Builders shared by the ranking tests (a tiny marketplace run) and the offer / user feature tests.

``make_world`` writes a prepared artifact (pyarrow only) where every user has training-period
events and, in val and test, one viewed, one carted and one purchased product (each from a known
seller), plus offers (some products have none), full histories and an untrained two-tower model in
``RUN_DIR/model``, saved the way ``recsys train`` saves it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ranking.features import (
    OFFER_FEATURES,
    USER_FEATURES,
    candidate_features,
    offer_feature_table,
    user_features_from_types,
)
from recsys.artifacts import atomic_artifact, write_manifest
from recsys.config import Config, fingerprint, load_config, to_dict
from retrieval.common import vocab_fingerprint_from_files
from towers.checkpoint import save_towers
from towers.shapes import TowerShape
from towers.two_tower import TwoTowerModel

N_USERS, N_PRODUCTS, N_SELLERS, N_CLUSTERS, N_TRAIN = 60, 64, 8, 4, 8
EXAMPLE_SCHEMA = pa.schema([("user_idx", pa.int32()), ("product_idx", pa.int32()), ("seller_idx", pa.int32()),
                            ("weight", pa.float32()), ("event", pa.int8()), ("ts", pa.int64()),
                            ("hist_products", pa.list_(pa.int32())), ("hist_sellers", pa.list_(pa.int32())),
                            ("hour", pa.int8()), ("dow", pa.int8())])


def world_cfg(*overrides: str) -> Config:
    return load_config(None, ["data.max_history=8", "ranking.candidates=10", "ranking.epochs=2",
                              "ranking.batch_size=16", "ranking.bootstrap_samples=50", "ranking.hidden=[32, 16]",
                              "ranking.cross_layers=2", "retrieval.recall_sample_queries=40",
                              "data.spark.shuffle_partitions=2", "train.register_model=false", *overrides])


def offers_of_world(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Offers: products 1..P with 1-3 sellers each, except every 12th product, which has none."""
    prods, sells = [], []
    for p in range(1, N_PRODUCTS + 1):
        if p % 12 == 0:
            continue
        for s in rng.choice(np.arange(1, N_SELLERS + 1), int(rng.integers(1, 4)), replace=False):
            prods.append(p)
            sells.append(int(s))
    prods, sells = np.asarray(prods), np.asarray(sells)
    price = (10.0 + prods % 7 * 5.0) * rng.uniform(0.8, 1.25, len(prods))
    stock = rng.choice([0, -1, 5, 40], len(prods))
    ship = rng.integers(1, 8, len(prods)).astype(np.float64)
    return prods, sells, price, stock, ship


def make_world(tmp: Path, cfg: Config | None = None, seed: int = 0, dim: int = 16) -> tuple[Path, Path, Config]:
    """(prepared dir, run dir with an untrained ``model/``, config) under ``tmp``."""
    cfg = cfg or world_cfg()
    rng = np.random.default_rng(seed)
    prep = Path(tmp) / "prep"
    for d in ("vocab", "features", "histories", "examples/train", "examples/val", "examples/test"):
        (prep / d).mkdir(parents=True, exist_ok=True)
    o_p, o_s, o_price, o_stock, o_ship = offers_of_world(rng)
    sellers_of = {p: o_s[o_p == p] for p in range(1, N_PRODUCTS + 1)}
    L = cfg.data.max_history
    rows = {s: {f: [] for f in EXAMPLE_SCHEMA.names} for s in ("train", "val", "test")}
    hist = {"user_idx": [], "products": [], "sellers": [], "types": []}
    for u in range(1, N_USERS + 1):
        c = u % N_CLUSTERS
        mine = np.arange(1, N_PRODUCTS + 1)[np.arange(1, N_PRODUCTS + 1) % N_CLUSTERS == c]
        picks = rng.choice(mine, N_TRAIN + 6, replace=False)
        events = []  # (split, product, seller, event)
        for i, p in enumerate(picks[:N_TRAIN]):
            events.append(("train", int(p), int(rng.choice(sellers_of[p])) if len(sellers_of[p]) else 0,
                           int(rng.choice([0, 0, 1, 2])) if i else 2))
        for split, trio in (("val", picks[N_TRAIN:N_TRAIN + 3]), ("test", picks[N_TRAIN + 3:])):
            for depth, p in enumerate(trio):  # view only / view + cart / view + cart + purchase
                s = int(rng.choice(sellers_of[p])) if len(sellers_of[p]) else 0
                for e in range(depth + 1):
                    events.append((split, int(p), s, e))
        hp, hs, ht = [], [], []
        for j, (split, p, s, e) in enumerate(events):
            r = rows[split]
            for k, v in (("user_idx", u), ("product_idx", p), ("seller_idx", s), ("weight", 1.0), ("event", e),
                         ("ts", 1000 * j + u), ("hist_products", hp[-L:]), ("hist_sellers", hs[-L:]),
                         ("hour", j % 24), ("dow", j % 7)):
                r[k].append(list(v) if isinstance(v, list) else v)
            hp.append(p)
            hs.append(s)
            ht.append(e)
        hist["user_idx"].append(u)
        hist["products"].append(hp)
        hist["sellers"].append(hs)
        hist["types"].append(ht)
    for split, r in rows.items():
        pq.write_table(pa.table(r, schema=EXAMPLE_SCHEMA), prep / "examples" / split / "part-0.parquet")
    pq.write_table(pa.table({"user_idx": pa.array(hist["user_idx"], pa.int32()),
                             "products": pa.array(hist["products"], pa.list_(pa.int32())),
                             "sellers": pa.array(hist["sellers"], pa.list_(pa.int32())),
                             "types": pa.array(hist["types"], pa.list_(pa.int8()))}), prep / "histories" / "full.parquet")
    for name, n in (("users", N_USERS), ("products", N_PRODUCTS), ("sellers", N_SELLERS), ("categories", N_CLUSTERS)):
        pq.write_table(pa.table({"id": [f"{name[0]}{i}" for i in range(1, n + 1)],
                                 "index": pa.array(range(1, n + 1), pa.int32()),
                                 "count": pa.array([1] * n, pa.int64())}), prep / "vocab" / f"{name}.parquet")
    pidx = np.arange(N_PRODUCTS + 1)
    price = np.where(pidx > 0, 10.0 + pidx % 7 * 5.0, -1.0)
    pq.write_table(pa.table({"product_idx": pa.array(pidx, pa.int32()),
                             "cat_l1": pa.array(np.where(pidx > 0, pidx % N_CLUSTERS + 1, 0), pa.int32()),
                             "cat_l2": pa.array(np.zeros(len(pidx)), pa.int32()),
                             "cat_l3": pa.array(np.zeros(len(pidx)), pa.int32()),
                             "log_price": pa.array(np.log1p(np.maximum(price, 0)) / 4, pa.float32()),
                             "raw_price": pa.array(price, pa.float32())}), prep / "features" / "products.parquet")
    sidx = np.arange(N_SELLERS + 1)
    rating = np.where(sidx > 0, 3.0 + sidx % 3 * 0.8, 0.0)
    pq.write_table(pa.table({"seller_idx": pa.array(sidx, pa.int32()), "rating": pa.array(rating / 5, pa.float32()),
                             "raw_rating": pa.array(rating, pa.float32())}), prep / "features" / "sellers.parquet")
    pq.write_table(pa.table({"product_idx": pa.array(o_p, pa.int32()), "seller_idx": pa.array(o_s, pa.int32()),
                             "price": pa.array(o_price, pa.float32()), "stock": pa.array(o_stock, pa.int32()),
                             "shipping_days": pa.array(o_ship, pa.float32())}), prep / "features" / "offers.parquet")
    write_manifest(prep, {"stage": "prepare", "n_users": N_USERS + 1, "n_products": N_PRODUCTS + 1,
                          "n_sellers": N_SELLERS + 1, "n_categories": N_CLUSTERS + 1, "n_brands": 1,
                          "has_timestamps": True, "split": {"method": "temporal"}})
    run = Path(tmp) / "run"
    torch.manual_seed(seed)
    pm = json.loads((prep / "manifest.json").read_text())
    shape = TowerShape(n_users=N_USERS + 1, n_products=N_PRODUCTS + 1, n_sellers=N_SELLERS + 1,
                       n_categories=N_CLUSTERS + 1, n_brands=1, n_product_features=0, n_seller_features=0,
                       dim=dim, hidden=32, sparse=False)
    model = TwoTowerModel(shape).eval()
    resolved = to_dict(cfg)
    extra = {"config": resolved, "config_fingerprint": fingerprint(resolved),
             "vocab_fingerprint": vocab_fingerprint_from_files(pm["files"]), "prepared": str(prep.resolve())}
    with atomic_artifact(run / "model", {"stage": "train", **extra}) as tmp_dir:
        save_towers(model, tmp_dir, extra)
    return prep, run, cfg


# ---------------------------------------------------------------------------------------------- feature tests


def test_offer_features_known_values() -> None:
    nan = np.nan
    # products 1 and 2 share category 5 (catalog prices 10 and 30: median 20); product 3 has no offer
    t = offer_feature_table(
        p_idx=np.array([1, 2, 3]), p_cats=np.array([[5, 0, 0], [5, 0, 0], [6, 0, 0]]), p_price=np.array([10.0, 30.0, 8.0]),
        o_product=np.array([1, 1, 2]), o_seller=np.array([1, 2, 1]), o_price=np.array([10.0, 20.0, nan]),
        o_stock=np.array([0, -1, 7]), o_ship=np.array([2.0, nan, 7.0]), n_products=4, n_sellers=3,
    )
    f = {n: i for i, n in enumerate(OFFER_FEATURES)}
    row = t.lookup(np.array([1, 1, 2, 3, 2]), np.array([1, 2, 1, 0, 2]))
    assert row[:4].min() >= 0 and row[4] == -1  # (2, 2) is not an offer
    x = t.features[row[:4]]
    assert x[0, f["log_price_vs_category"]] == pytest.approx(np.log(10 / 20), abs=1e-6)
    assert x[1, f["log_price_vs_min"]] == pytest.approx(np.log(2.0), abs=1e-6)
    assert x[:2, f["is_lowest_price"]].tolist() == [1.0, 0.0]
    assert x[0, f["out_of_stock"]] == 1 and x[1, f["stock_unknown"]] == 1 and x[2, f["log_stock"]] > 0
    assert x[1, f["shipping_unknown"]] == 1 and x[2, f["shipping_days"]] == pytest.approx(1.0)
    assert x[2, f["price_unknown"]] == 1 and x[2, f["is_lowest_price"]] == 0
    assert x[3, f["no_offer"]] == 1 and x[3, f["log_price_vs_category"]] == pytest.approx(0.0)  # alone in cat 6
    assert t.rows_of_product(1) == slice(0, 2)
    unk = t.features_of(np.array([2]), np.array([2]))[0]
    assert unk[f["price_unknown"]] == 1 and unk[f["no_offer"]] == 0


def test_user_and_candidate_features() -> None:
    u = user_features_from_types(np.array([0, 0, 1, 2, 2, 0]), window=4)  # last 4: cart, purchase, purchase, view
    assert len(u) == len(USER_FEATURES)
    assert u[1] == pytest.approx(0.5) and u[2] == pytest.approx(0.25)
    assert u[0] == pytest.approx(np.log1p(4) / np.log1p(4))
    c = candidate_features(np.array([0.5, 0.1]), np.array([1, 100]), 100)
    assert c[0, 0] == pytest.approx(0.5) and c[1, 1] == pytest.approx(1.0) and 0 < c[0, 1] < c[1, 1]
    beyond = candidate_features(np.array([0.0, 0.0]), np.array([500, 500]), 100)[:, 1]
    assert beyond[0] == pytest.approx(1.0)  # serving clips to the trained list length
    assert (c[:, 2] == 0).all()
    # A missed positive added to a training list looks like its list's average retrieved row, flagged,
    # never like "the lowest score / the last rank".
    score, rank = np.array([0.9, 0.5, 0.1, 0.8, 0.2, 0.0]), np.array([1, 2, 500, 1, 2, 700])
    added, lists = np.array([False, False, True, False, False, True]), np.array([0, 0, 0, 1, 1, 1])
    f = candidate_features(score, rank, 100, added, lists)
    assert f[2, 0] == pytest.approx(0.7) and f[5, 0] == pytest.approx(0.5)
    assert f[2, 1] == pytest.approx((f[0, 1] + f[1, 1]) / 2) and f[5, 1] == pytest.approx(f[2, 1])
    assert f[:, 2].tolist() == [0, 0, 1, 0, 0, 1]
    assert np.allclose(f[~added], candidate_features(score[~added], rank[~added], 100))


def test_catalog_ranks_skip_excluded_items_and_row_zero() -> None:
    from ranking.data import catalog_ranks

    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.5, 0.1], [0.9, 0.0], [0.2, 0.3]])  # row 0 never counts
    exclude = (np.array([0, 1, 1]), np.array([3]))  # user 0 already bought product 3
    got = catalog_ranks(u, p, exclude, np.array([0, 0, 1, 1]), np.array([2, 4, 4, 1]), batch=1, max_floats=2)
    # user 0: p1 (1.0) > p2 (0.5) > p4 (0.2), p3 excluded; user 1: p4 (0.3) > p2 (0.1) > p1 = p3 (0)
    assert got.tolist() == [2, 3, 1, 3]
