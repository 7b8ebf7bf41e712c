"""The built-in synthetic marketplace generator: determinism, raw contract, planted signal."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines.schema import EVENT_TYPES, OPTIONAL_COLUMNS, REQUIRED_COLUMNS
from data_pipelines.synthetic import PRESETS, SyntheticSpec, generate, oracle_scores

TABLES = ("events", "products", "offers", "sellers", "users")


def _read(out, name: str) -> pa.Table:
    path = out / name if (out / name).is_dir() else out / f"{name}.parquet"
    return pq.read_table(path)


def _epoch(col: pd.Series) -> np.ndarray:
    return col.astype("datetime64[s, UTC]").astype("int64").to_numpy()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn_small")
    summary = generate(out, "small", seed=7)
    return out, summary


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn_tiny")
    summary = generate(out, "tiny", seed=7)
    return out, summary


def test_deterministic_for_a_seed(small, tmp_path):
    out1, s1 = small
    out2 = tmp_path / "again"
    s2 = generate(out2, "small", seed=7)
    assert {k: v for k, v in s1.items() if k != "seconds"} == {k: v for k, v in s2.items() if k != "seconds"}
    for name in TABLES:
        pd.testing.assert_frame_equal(_read(out1, name).to_pandas(), _read(out2, name).to_pandas())
    # byte-identical files, including the latent factors
    for rel in ("events/part-00000.parquet", "products.parquet", "offers.parquet", "_latent/latent.npz"):
        assert (out1 / rel).read_bytes() == (out2 / rel).read_bytes(), rel


def test_different_seed_differs(tiny, tmp_path):
    out1, _ = tiny
    out2 = tmp_path / "seed8"
    generate(out2, "tiny", seed=8)
    for name in ("events", "products", "offers"):
        assert not _read(out1, name).equals(_read(out2, name)), name


def test_chunking_bounds_memory_and_keeps_contract(tmp_path):
    """Several part files (one per user chunk); the row count follows the spec's target."""
    summary = generate(tmp_path, "tiny", seed=3, overrides={"chunk_users": 400, "block_events": 1000})
    parts = sorted((tmp_path / "events").glob("part-*.parquet"))
    assert len(parts) == summary["event_parts"] == 4
    n = sum(pq.read_metadata(p).num_rows for p in parts)
    assert n == summary["events"]
    assert 0.8 * PRESETS["tiny"].n_events < n < 1.2 * PRESETS["tiny"].n_events


def test_raw_contract(small):
    out, summary = small
    tables = {name: _read(out, name) for name in TABLES}
    for name, t in tables.items():
        cols = set(t.column_names)
        assert set(REQUIRED_COLUMNS[name]) <= cols, name
        assert cols <= set(REQUIRED_COLUMNS[name]) | set(OPTIONAL_COLUMNS[name]), name
        for c in cols:
            if c.endswith("_id") or c in ("event_type", "category", "brand", "title", "region"):
                assert t.schema.field(c).type == pa.string(), (name, c)
    ev_schema = tables["events"].schema
    for name, col in (("events", "timestamp"), ("products", "created_at"), ("sellers", "created_at")):
        assert tables[name].schema.field(col).type == pa.timestamp("ms", tz="UTC"), (name, col)
    assert ev_schema.field("price").type == pa.float64()
    assert ev_schema.field("quantity").type == pa.int32()
    assert tables["offers"].schema.field("stock").type == pa.int32()
    assert tables["offers"].schema.field("shipping_days").type == pa.int32()
    assert tables["users"].schema.field("signup_date").type == pa.date32()

    ev = tables["events"].to_pandas()
    products = tables["products"].to_pandas()
    offers = tables["offers"].to_pandas()
    sellers = tables["sellers"].to_pandas()
    users = tables["users"].to_pandas()
    assert len(ev) == summary["events"] and len(products) == summary["products"]
    for df, key in ((products, "product_id"), (sellers, "seller_id"), (users, "user_id")):
        assert df[key].is_unique
    assert not offers.duplicated(["product_id", "seller_id"]).any()
    assert ev["user_id"].str.fullmatch(r"u\d{6}").all()
    assert ev["product_id"].str.fullmatch(r"p\d{5}").all()
    assert ev["seller_id"].str.fullmatch(r"s\d{4}").all()
    assert set(ev["event_type"]) == set(EVENT_TYPES)
    assert products["category"].str.count(" > ").eq(2).all()
    assert sellers["rating"].between(1, 5).all()
    assert (offers["stock"] == 0).any() and (offers["stock"] > 0).any()
    assert offers["shipping_days"].between(1, 30).all() and (offers["price"] > 0).all()
    assert ev.groupby("product_id").seller_id.nunique().max() > 1  # products have several sellers

    # referential integrity: events -> products / users; every event's (product, seller) is an offer
    assert ev["product_id"].isin(products["product_id"]).all()
    assert ev["user_id"].isin(users["user_id"]).all()
    pairs = ev[["product_id", "seller_id"]].drop_duplicates().merge(offers, how="left", indicator=True)
    assert (pairs["_merge"] == "both").all()
    assert offers["product_id"].isin(products["product_id"]).all()
    assert offers["seller_id"].isin(sellers["seller_id"]).all()

    # time: inside the period; nothing before the product / seller exists or the user signs up
    meta = json.loads((out / "generator.json").read_text())
    start = datetime.fromisoformat(meta["start"].replace("Z", "+00:00")).timestamp()
    end = datetime.fromisoformat(meta["end"].replace("Z", "+00:00")).timestamp()
    t = _epoch(ev["timestamp"])
    assert t.min() >= start and t.max() < end
    created = dict(zip(products["product_id"], _epoch(products["created_at"]), strict=True))
    assert (t >= ev["product_id"].map(created).to_numpy()).all()
    late = products[_epoch(products["created_at"]) >= start]
    assert 0.05 * len(products) < len(late) < 0.15 * len(products)
    assert ev["product_id"].isin(late["product_id"]).any()  # cold-start products do get events
    s_created = dict(zip(sellers["seller_id"], _epoch(sellers["created_at"]), strict=True))
    assert (t >= ev["seller_id"].map(s_created).to_numpy()).all()
    signup = dict(
        zip(users["user_id"], users["signup_date"].astype("datetime64[s]").astype("int64"), strict=True)
    )
    assert (t >= ev["user_id"].map(signup).to_numpy()).all()

    # per-user activity is long-tailed; sessions group a user's events
    per_user = ev.groupby("user_id").size()
    assert 5 <= per_user.median() <= 30 and per_user.max() > 10 * per_user.median()
    assert (ev["session_id"].str.rsplit("-", n=1).str[0] == ev["user_id"]).all()
    assert ev.groupby("session_id").size().median() >= 2
    # repeat purchases of consumables exist
    buys = ev[ev["event_type"] == "purchase"]
    assert buys.duplicated(["user_id", "product_id"]).sum() > 0.02 * len(buys)


def test_funnel(small):
    out, summary = small
    counts = _read(out, "events").to_pandas()["event_type"].value_counts()
    assert counts["view"] > 2 * counts["cart"]
    assert counts["cart"] > counts["purchase"] > 0.05 * counts["view"]
    assert (counts["view"], counts["cart"], counts["purchase"]) == (
        summary["views"],
        summary["carts"],
        summary["purchases"],
    )


def _recall_at(top: np.ndarray, held: list[set[int]]) -> float:
    return float(
        np.mean([len(held[i].intersection(top[i].tolist())) / len(held[i]) for i in range(len(held))])
    )


def test_planted_signal_is_learnable(tiny):
    """Held-out purchases (last 20% of the period) are found by the true model far better than by
    popularity, and by popularity far better than at random."""
    out, _ = tiny
    ev = _read(out, "events").to_pandas()
    t = _epoch(ev["timestamp"])
    lo, hi = t.min(), t.max()
    cut = lo + 0.8 * (hi - lo)
    test = ev[(t >= cut) & (ev["event_type"] == "purchase").to_numpy()]
    held_by_user = test.groupby("user_id")["product_id"].apply(set)
    users = list(held_by_user.index)
    assert len(users) > 200

    product_ids, scores = oracle_scores(out, users, at_time=cut + 0.1 * (hi - lo))
    assert scores.shape == (len(users), len(product_ids)) and scores.dtype == np.float32
    assert product_ids == sorted(product_ids)
    pos = {p: i for i, p in enumerate(product_ids)}
    held = [{pos[p] for p in s} for s in held_by_user]
    k = 20
    top_oracle = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    train_counts = ev[t < cut]["product_id"].value_counts().reindex(product_ids).fillna(0).to_numpy()
    top_pop = np.tile(np.argsort(-train_counts, kind="stable")[:k], (len(users), 1))
    rng = np.random.default_rng(0)
    top_rand = np.stack([rng.choice(len(product_ids), k, replace=False) for _ in users])
    r_oracle, r_pop, r_rand = (_recall_at(x, held) for x in (top_oracle, top_pop, top_rand))
    # measured (tiny, seed 7): oracle ~0.83, popularity ~0.21, random ~0.025
    assert r_oracle > 2.5 * r_pop, (r_oracle, r_pop)
    assert r_pop > 3 * r_rand, (r_pop, r_rand)


def test_oracle_respects_release_time_and_ids(tiny):
    out, _ = tiny
    products = _read(out, "products").to_pandas()
    meta = json.loads((out / "generator.json").read_text())
    at = datetime.fromisoformat(meta["start"].replace("Z", "+00:00")).timestamp() + 0.8 * 180 * 86400
    pids, scores = oracle_scores(out, ["u000000", "u000001"], at_time=at)
    assert pids == sorted(products["product_id"])
    created = dict(zip(products["product_id"], _epoch(products["created_at"]), strict=True))
    released = np.array([created[p] <= at for p in pids])
    assert 0 < (~released).sum() < 0.1 * len(pids)
    assert np.isneginf(scores[:, ~released]).all() and np.isfinite(scores[:, released]).all()
    _, at_end = oracle_scores(out, ["u000000"], at_time=datetime(2024, 6, 29, tzinfo=timezone.utc))
    assert np.isfinite(at_end).all()
    with pytest.raises(KeyError):
        oracle_scores(out, ["u999999"])


def test_spec_validation():
    with pytest.raises(ValueError):
        SyntheticSpec(n_users=10, n_products=5, n_sellers=20, n_events=100)
    with pytest.raises(ValueError):
        generate("/nonexistent-never-written", "huge")


def test_seller_choice_carries_signal(small):
    """Where a product has several offers, buyers pick better-rated and cheaper sellers."""
    out, _ = small
    ev = _read(out, "events").to_pandas()
    offers = _read(out, "offers").to_pandas()
    sellers = _read(out, "sellers").to_pandas()[["seller_id", "rating"]]
    offers = offers.merge(sellers, on="seller_id")
    per_product = offers.groupby("product_id").agg(
        n=("seller_id", "size"), mean_rating=("rating", "mean"), mean_price=("price", "mean")
    )
    buys = (
        ev[ev["event_type"] == "purchase"].merge(sellers, on="seller_id").join(per_product, on="product_id")
    )
    buys = buys[buys["n"] > 1]
    assert len(buys) > 1000
    rating_gain = (buys["rating"] - buys["mean_rating"]).mean()
    price_ratio = (buys["price"] / buys["mean_price"]).mean()
    # measured (small, seed 7): rating +0.09, price ratio 0.97
    assert rating_gain > 0.03, rating_gain
    assert price_ratio < 0.99, price_ratio
