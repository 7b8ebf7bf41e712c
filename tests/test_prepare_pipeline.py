"""End-to-end ``prepare`` runs on a small raw contract directory (CSV and Parquet variants).

The module runs the pipeline twice (CSV, then the same tables as Parquet part folders) and checks
the artifact: manifest, schemas, vocabularies, leak-free histories, train-only features,
deterministic output and the atomic commit.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_pipelines import prepare
from data_pipelines.examples import EXAMPLE_ARROW_SCHEMA
from data_pipelines.schema import EXAMPLE_COLUMNS, PRODUCT_CATEGORICALS, PRODUCT_FEATURES, SELLER_FEATURES
from recsys.artifacts import read_manifest
from recsys.config import Config, DataConfig
from tests.test_prepare_common import DAY, make_raw, write_raw

H = 4
WEIGHTS = {"view": 0.05, "cart": 0.3, "purchase": 1.0}


def _cfg() -> Config:
    return Config(
        data=DataConfig(max_history=H, rows_per_row_group=16, val_fraction=0.15, test_fraction=0.15, price_bands=4)
    )


@pytest.fixture(scope="module")
def raw():
    return make_raw()


@pytest.fixture(scope="module")
def csv_run(spark, raw, tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    data = write_raw(raw["tables"], root / "raw_csv", "csv")
    out = root / "prepared"
    manifest = prepare.run(_cfg(), str(data), str(out))
    return out, manifest


@pytest.fixture(scope="module")
def parquet_run(spark, raw, tmp_path_factory):
    root = tmp_path_factory.mktemp("prep_pq")
    data = write_raw(raw["tables"], root / "raw_pq", "parquet")
    out = root / "prepared"
    manifest = prepare.run(_cfg(), str(data), str(out))
    return out, manifest


def _read(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def _vocab(out: Path, name: str) -> dict[str, int]:
    v = _read(out / "vocab" / f"{name}.parquet")
    return dict(zip(v["id"], v["index"], strict=False))


def _split_of(ts: pd.Series, manifest: dict) -> pd.Series:
    cut = manifest["split"]["cutoffs"]
    return pd.Series(
        np.where(ts >= cut["test_cutoff"], "test", np.where(ts >= cut["val_cutoff"], "val", "train")), index=ts.index
    )


def _good_indexed(raw, out: Path, manifest: dict) -> pd.DataFrame:
    g = raw["good_events"].copy()
    g["user_idx"] = g.user_id.map(_vocab(out, "users"))
    g["product_idx"] = g.product_id.map(_vocab(out, "products"))
    sellers = _vocab(out, "sellers")
    g["seller_idx"] = g.seller_id.map(lambda s: sellers.get(s, 0) if s else 0)
    g["split"] = _split_of(g.ts, manifest)
    g["w"] = g.event_type.map(WEIGHTS)
    return g


def test_manifest_and_schemas(csv_run, raw):
    out, m = csv_run
    assert read_manifest(out, verify=True)["stage"] == "prepare"
    assert m["config"]["data"]["max_history"] == H
    assert m["has_timestamps"] is True and m["split"]["method"] == "temporal"
    assert m["split"]["cutoffs"]["val_cutoff"] < m["split"]["cutoffs"]["test_cutoff"]
    # input checksums of every raw file
    assert set(m["inputs"]) == {"events", "products", "offers", "sellers", "users"}
    assert all(f["sha256"] for t in m["inputs"].values() for f in t["files"].values())
    # rejected counts per table and reason; the invariant
    for name, expected in raw["expected_rejected"].items():
        assert m["rejected"][name] == expected
        v = m["validation"][name]
        non_dup = sum(n for r, n in v["rejected"].items() if r != "duplicate")
        assert v["input"] == len(raw["tables"][name]) == v["accepted"] + non_dup + v["duplicates"]
    rej = _read(out / "rejected" / "events.parquet")
    assert sorted(rej.reason) == sorted(raw["expected_rejected"]["events"])
    # sizes include the reserved 0
    for name in ("users", "products", "sellers", "categories", "brands"):
        v = _read(out / "vocab" / f"{name}.parquet")
        assert m["vocab_sizes"][name] == m[f"n_{name}"] == int(v["index"].max()) + 1
    # examples: exact columns and types, row groups of rows_per_row_group
    total = 0
    for split in ("train", "val", "test"):
        files = sorted((out / "examples" / split).glob("*.parquet"))
        assert files
        for f in files:
            pf = pq.ParquetFile(f)
            assert pf.schema_arrow.equals(EXAMPLE_ARROW_SCHEMA)
            sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
            assert all(s == 16 for s in sizes[:-1]) and sizes[-1] <= 16
        n = pq.read_table(out / "examples" / split).num_rows
        assert n == m["rows"]["examples"][split] > 0
        total += n
    good = raw["good_events"]
    assert total == len(good)  # every event type is a positive by default; nobody below min counts
    assert tuple(pq.read_table(out / "examples" / "train").column_names) == EXAMPLE_COLUMNS
    p = _read(out / "features" / "products.parquet")
    assert set(PRODUCT_FEATURES + PRODUCT_CATEGORICALS) <= set(p.columns)
    assert list(p.product_idx) == list(range(m["n_products"]))
    s = _read(out / "features" / "sellers.parquet")
    assert set(SELLER_FEATURES) <= set(s.columns) and list(s.seller_idx) == list(range(m["n_sellers"]))
    assert not any(p.name.startswith((".", "_")) for p in out.rglob("*"))


def test_vocabularies(csv_run, raw):
    out, m = csv_run
    for name in ("users", "products", "sellers", "categories", "brands"):
        v = _read(out / "vocab" / f"{name}.parquet")
        assert 0 not in set(v["index"])
        assert list(v["index"]) == list(range(1, len(v) + 1))
        order = v.sort_values(["count", "id"], ascending=[False, True])
        assert list(order["index"]) == list(v["index"])
    prods = _read(out / "vocab" / "products.parquet").set_index("id")
    # catalog products with no events are indexable (cold start); rejected "pbad" is not there
    assert prods.loc["p15", "count"] == 0
    assert "not_in_catalog" not in prods.index
    cats = set(_read(out / "vocab" / "categories.parquet")["id"])
    assert {"c1", "c1 > d0", "c1 > d0 > e"} <= cats and "" not in cats
    pf = _read(out / "features" / "products.parquet").set_index("product_idx")
    cv = _vocab(out, "categories")
    row = pf.loc[prods.loc["p10", "index"]]  # "c1 > d0 > e"
    assert (row.cat_l1, row.cat_l2, row.cat_l3) == (cv["c1"], cv["c1 > d0"], cv["c1 > d0 > e"])
    assert pf.loc[0, list(PRODUCT_FEATURES)].abs().sum() == 0


def test_histories_are_leak_free(csv_run, raw):
    out, m = csv_run
    g = _good_indexed(raw, out, m)
    visible = {"train": {"train"}, "val": {"train"}, "test": {"train", "val"}}
    n_checked = n_nonempty = 0
    for split in ("train", "val", "test"):
        ex = pq.read_table(out / "examples" / split).to_pandas()
        for r in ex.itertuples():
            ev_u = g[(g.user_idx == r.user_idx) & g.split.isin(visible[split]) & (g.ts < r.ts)].sort_values("ts")
            exp = ev_u.iloc[-H:] if len(ev_u) else ev_u
            assert len(r.hist_products) == len(exp) == len(r.hist_sellers)
            for i, (p, s) in enumerate(zip(r.hist_products, r.hist_sellers, strict=False)):
                # strictly before the example's ts and in a visible split; ties may come in either order
                same_ts = ev_u[ev_u.ts == exp.iloc[i].ts]
                assert (p, s) in set(zip(same_ts.product_idx, same_ts.seller_idx, strict=False))
            n_checked += 1
            n_nonempty += bool(len(exp))
            # the example itself is a known event of this split
            own = g[(g.user_idx == r.user_idx) & (g.ts == r.ts) & (g.product_idx == r.product_idx)]
            assert len(own) and (own.split == split).all()
            assert r.hour == (r.ts // 3600) % 24 and r.dow == ((r.ts // DAY) + 3) % 7
    assert n_checked == len(g) and n_nonempty > len(g) // 2


def test_user_histories_tables(csv_run, raw):
    out, m = csv_run
    g = _good_indexed(raw, out, m)
    # train: the last 4 × max_history events; full: every event (serving excludes all bought items).
    for name, splits, cap in (("train", {"train"}, 4 * H), ("full", {"train", "val", "test"}, None)):
        h = _read(out / "histories" / f"{name}.parquet").set_index("user_idx")
        sub = g[g.split.isin(splits)]
        assert set(h.index) == set(sub.user_idx)
        for u, grp in sub.groupby("user_idx"):
            grp = grp.sort_values("ts")
            grp = grp.iloc[-cap:] if cap else grp
            assert sorted(h.loc[u, "products"]) == sorted(grp.product_idx)
            assert len(h.loc[u, "types"]) == len(grp)


def test_features_use_train_events_only(csv_run, raw):
    out, m = csv_run
    g = _good_indexed(raw, out, m)
    train = g[g.split == "train"]
    pf = _read(out / "features" / "products.parquet").set_index("product_idx")
    pop = train.groupby("product_idx").w.sum()
    for idx in pf.index[1:]:
        assert math.isclose(pf.loc[idx, "raw_pop_all"], pop.get(idx, 0.0), rel_tol=1e-5, abs_tol=1e-6)
    cutoff = m["features"]["train_cutoff"]
    assert cutoff == train.ts.max()
    scale7 = m["features"]["product_scales"]["log_pop_7d"]
    pop7 = train[train.ts > cutoff - 7 * DAY].groupby("product_idx").w.sum()
    for idx in pf.index[1:]:
        assert math.isclose(pf.loc[idx, "log_pop_7d"] * scale7, math.log1p(pop7.get(idx, 0.0)), abs_tol=1e-5)
    # the product seen only in the test period has no train popularity
    late = _vocab(out, "products")["p14"]
    assert (g[g.product_idx == late].split == "test").all() and pf.loc[late, "raw_pop_all"] == 0
    freq = _read(out / "features" / "product_freq.parquet").set_index("product_idx")
    assert len(freq) == m["n_products"]
    for idx in freq.index[1:]:
        assert math.isclose(freq.loc[idx, "count"], pop.get(idx, 0.0), rel_tol=1e-5, abs_tol=1e-6)
    assert np.isfinite(freq.logq).all() and freq.logq.max() < 0
    sf = _read(out / "features" / "sellers.parquet").set_index("seller_idx")
    sales = train[train.event_type == "purchase"].groupby("seller_idx").size()
    for idx in sf.index[1:]:
        assert sf.loc[idx, "raw_sales"] == sales.get(idx, 0)
    # the seller without a rating gets the mean rating
    assert math.isclose(sf.loc[_vocab(out, "sellers")["s2"], "raw_rating"], np.mean([3.0, 3.5, 4.5]), rel_tol=1e-5)
    offers = _read(out / "features" / "offers.parquet")
    assert (offers.stock >= -1).all() and (offers.shipping_days >= -1).all() and (offers.stock == -1).any()


def test_parquet_input_gives_identical_output(csv_run, parquet_run):
    (a, ma), (b, mb) = csv_run, parquet_run
    assert mb["inputs"]["events"]["format"] == "parquet"
    assert ma["rejected"] == mb["rejected"]
    for rel in [
        "examples/train",
        "examples/val",
        "examples/test",
        "vocab/users.parquet",
        "vocab/products.parquet",
        "vocab/categories.parquet",
        "features/products.parquet",
        "features/sellers.parquet",
        "features/offers.parquet",
        "features/product_freq.parquet",
        "histories/full.parquet",
        "histories/train.parquet",
    ]:
        ta, tb = pq.read_table(a / rel), pq.read_table(b / rel)
        assert ta.equals(tb), rel


def _sorted_rows(t):
    """A table's rows in a canonical order (part files follow Spark's partitioning, not the data)."""
    keys = [c for c in ("user_idx", "ts", "product_idx", "seller_idx", "event", "weight") if c in t.column_names]
    return t.sort_by([(c, "ascending") for c in keys])


@pytest.mark.parametrize("broadcast_vocab_rows", [0, 2_000_000])
def test_sort_merge_joins_give_the_same_rows(spark, raw, csv_run, tmp_path, broadcast_vocab_rows):
    # The example and history builders need each user's events in one partition. Validation
    # shuffles the events by user; a sort-merge join on the way moves them by its key (the
    # unknown-product check against a catalog too large to broadcast, forced here for every size;
    # with 0, the vocabulary lookups as well), and prepare must then shuffle them by user again.
    cfg = _cfg()
    spark_cfg = replace(cfg.data.spark, broadcast_vocab_rows=broadcast_vocab_rows)
    cfg = replace(cfg, data=replace(cfg.data, spark=spark_cfg))
    data = write_raw(raw["tables"], tmp_path / "raw_pq", "parquet")
    with prepare.sql_conf(spark, {"spark.sql.autoBroadcastJoinThreshold": "-1"}):  # no automatic broadcasts
        m = prepare.run(cfg, str(data), str(tmp_path / "prepared"))
    a, ma = csv_run
    assert m["rows"] == ma["rows"]
    for rel in ["examples/train", "examples/val", "examples/test", "histories/full.parquet", "histories/train.parquet"]:
        ta, tb = pq.read_table(a / rel), pq.read_table(tmp_path / "prepared" / rel)
        assert _sorted_rows(ta).equals(_sorted_rows(tb)), rel


def test_hash_partitioned_by_reads_the_plan(spark):
    from data_pipelines.partitioning import hash_partitioned_by

    df = spark.range(50).selectExpr("cast(id % 7 as string) as u", "id")
    grouped = df.repartition("u").groupBy("u", "id").count()
    with prepare.sql_conf(spark, {"spark.sql.adaptive.enabled": "false"}):  # as prepare runs
        assert hash_partitioned_by(grouped, "u")
        assert hash_partitioned_by(grouped.withColumnRenamed("u", "user_id"), "user_id")  # aliases followed
        assert not hash_partitioned_by(grouped, "id")
        assert not hash_partitioned_by(df, "u")
        assert not hash_partitioned_by(df.repartition("u", "id"), "u")  # by two columns: a user may straddle
    with prepare.sql_conf(spark, {"spark.sql.adaptive.enabled": "true"}):
        # decided at run time: not known, so not assumed (a new DataFrame: a plan is made once)
        assert not hash_partitioned_by(df.repartition("u").groupBy("u", "id").count(), "u")


def test_failure_leaves_no_artifact(spark, csv_run, raw, tmp_path, monkeypatch):
    out, m = csv_run
    data = write_raw({"events": raw["tables"]["events"]}, tmp_path / "raw", "csv")

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(prepare, "assign_splits", boom)
    fresh = tmp_path / "prepared"
    with pytest.raises(RuntimeError, match="injected"):
        prepare.run(_cfg(), str(data), str(fresh))
    assert not fresh.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    before = (out / "manifest.json").read_text()
    with pytest.raises(RuntimeError, match="injected"):
        prepare.run(replace(_cfg()), str(data), str(out))
    assert (out / "manifest.json").read_text() == before
    read_manifest(out, verify=True)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
