"""Source adapters on tiny fixtures in the exact public file layouts, plus the real Gowalla split."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from data_pipelines.adapters import SOURCES, detect_source, read_source
from data_pipelines.schema import OPTIONAL_COLUMNS, REQUIRED_COLUMNS

FIX = Path(__file__).parent / "fixtures"


def _epoch(s: str) -> int:
    return int(datetime.strptime(s, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp())


def _check_contract(tables):
    for name, df in tables.items():
        assert name in REQUIRED_COLUMNS, name
        for c in REQUIRED_COLUMNS[name]:
            assert c in df.columns, (name, c)
            assert dict(df.dtypes)[c] == "string", (name, c)
    ev = tables["events"]
    for c in ev.columns:
        assert c in REQUIRED_COLUMNS["events"] + OPTIONAL_COLUMNS["events"], c
    if "timestamp" in ev.columns:
        assert dict(ev.dtypes)["timestamp"] in ("bigint", "timestamp")
    types = {r[0] for r in ev.select("event_type").distinct().collect()}
    assert types <= {"view", "cart", "purchase"}


def test_detect_source(tmp_path):
    assert detect_source(FIX / "olist") == "olist"
    assert detect_source(FIX / "lightgcn") == "lightgcn"
    for d in ("movielens_1m", "movielens_25m", "movielens_100k"):
        assert detect_source(FIX / d) == "movielens"
    (tmp_path / "events.csv").write_text("user_id,product_id\na,b\n")
    assert detect_source(tmp_path) == "contract"
    for name in ("events.tsv", "events.csv.gz"):
        other = tmp_path / name.replace(".", "_")
        other.mkdir()
        (other / name).write_bytes(b"")
        assert detect_source(other) == "contract", name
    assert set(SOURCES) == {"contract", "olist", "lightgcn", "movielens"}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="cannot tell the source"):
        detect_source(empty)
    with pytest.raises(FileNotFoundError):
        detect_source(tmp_path / "nope")
    assert read_source(None, "contract", str(tmp_path)) is None
    with pytest.raises(ValueError, match="unknown data source"):
        read_source(None, "parquet-dump", str(tmp_path))


def test_olist(spark):
    t = read_source(spark, "auto", str(FIX / "olist"))
    assert set(t) == {"events", "products", "offers", "sellers", "users"}
    _check_contract(t)

    ev = {(r.user_id, r.product_id, r.seller_id): r for r in t["events"].collect()}
    # canceled o4 and unavailable o5 are dropped; o1's two p1 units are one event with quantity 2
    assert set(ev) == {("u1", "p1", "s1"), ("u1", "p2", "s2"), ("u1", "p2", "s1"), ("u2", "p3", "s2")}
    e = ev[("u1", "p1", "s1")]
    assert (e.quantity, e.price, e.session_id, e.event_type) == (2, pytest.approx(29.99), "o1", "purchase")
    assert e.timestamp == _epoch("2017-10-02 10:56:33")
    assert ev[("u2", "p3", "s2")].timestamp == _epoch("2018-02-01 08:00:00")
    assert dict(t["events"].dtypes)["timestamp"] == "bigint"

    p = {r.product_id: r for r in t["products"].collect()}
    assert set(p) == {"p1", "p2", "p3", "p4"}
    assert p["p1"].category == "health_beauty"  # translated (the translation file has a BOM and CRLF)
    assert p["p2"].category == "cama_mesa_banho"  # no translation: Portuguese name
    assert p["p3"].category is None and p["p3"].name_length is None and p["p3"].weight_g == 500.0
    assert p["p4"].category == "computers_accessories" and p["p4"].price is None
    assert p["p2"].price == pytest.approx(105.0)  # median of 100 and 110
    assert p["p1"].created_at == _epoch("2017-10-02 10:56:33")

    s = {r.seller_id: r for r in t["sellers"].collect()}
    assert set(s) == {"s1", "s2", "s3"}
    assert s["s1"].rating == pytest.approx(3.0)  # o1: 4, o2: 2 (o4's review is of a canceled order)
    assert s["s2"].rating == pytest.approx(4.0)  # o1: 4, o3: mean(5, 3) (multi-line quoted comment)
    assert s["s3"].rating is None and s["s3"].region == "SP" and s["s3"].created_at is None
    assert s["s2"].region == "RJ"

    o = {(r.product_id, r.seller_id): r for r in t["offers"].collect()}
    assert set(o) == {("p1", "s1"), ("p2", "s2"), ("p2", "s1"), ("p3", "s2")}
    delivery_o1 = (_epoch("2017-10-10 21:25:13") - _epoch("2017-10-02 10:56:33")) / 86400
    assert o[("p1", "s1")].shipping_days == pytest.approx(delivery_o1)
    assert o[("p2", "s1")].shipping_days == pytest.approx(3.0)
    assert o[("p3", "s2")].shipping_days is None  # shipped, not delivered
    assert all(r.stock is None for r in o.values())
    assert o[("p2", "s1")].price == pytest.approx(110.0)

    u = {r.user_id: r.region for r in t["users"].collect()}
    assert u == {"u1": "RJ", "u2": "RJ", "u3": "MG", "u4": "SP"}  # u1's latest order is from RJ


def test_olist_catalog_only_is_a_clear_error(spark, tmp_path):
    (tmp_path / "olist_products_dataset.csv").write_text(
        (FIX / "olist" / "olist_products_dataset.csv").read_text()
    )
    assert detect_source(tmp_path) == "olist"
    with pytest.raises(FileNotFoundError, match="olist_orders_dataset.csv"):
        read_source(spark, "olist", str(tmp_path))


def test_lightgcn(spark):
    t = read_source(spark, "lightgcn", str(FIX / "lightgcn"))
    _check_contract(t)
    rows = sorted((r.split, r.user_id, r.product_id) for r in t["events"].collect())
    train = [(u, p) for s, u, p in rows if s == "train"]
    test = [(u, p) for s, u, p in rows if s == "test"]
    assert sorted(train) == sorted(
        [("0", "0"), ("0", "1"), ("0", "2"), ("1", "3"), ("1", "1"), ("3", "4"), ("3", "4"), ("3", "0")]
    )
    assert sorted(test) == [("0", "3"), ("1", "0"), ("1", "2"), ("2", "1")]
    assert "timestamp" not in t["events"].columns
    assert sorted(r.user_id for r in t["users"].collect()) == ["0", "1", "2", "3"]


def test_lightgcn_marks_the_end_of_each_train_line_as_val(spark, tmp_path):
    lines = ["7 " + " ".join(str(i) for i in range(10)), "8 5 6", "9 4"]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.txt").write_text("7 20\n")
    t = read_source(spark, "lightgcn", str(tmp_path), val_last_fraction=0.3, seed=1)
    ev = [(r.user_id, r.product_id, r.split) for r in t["events"].collect()]
    val = {(u, p) for u, p, s in ev if s == "val"}
    # user 7: 3 of 10 items (0.3 * 10, no rounding), the last three of the line
    assert {p for u, p in val if u == "7"} == {"7", "8", "9"}
    # a one-item line keeps its item in train; test rows are never val
    assert ("9", "4") not in val and ("7", "20", "test") in ev
    assert sum(s == "train" for u, _, s in ev if u == "8") >= 1
    plain = read_source(spark, "lightgcn", str(tmp_path))
    assert {r.split for r in plain["events"].collect()} == {"train", "test"}


def test_lightgcn_line_order_gives_positions_as_timestamps(spark, tmp_path):
    """line_order: train items get their line position (from 1); test items follow the user's train items."""
    (tmp_path / "train.txt").write_text("7 30 31 32\n8 5\n")
    (tmp_path / "test.txt").write_text("7 40 41\n9 6\n")
    t = read_source(spark, "lightgcn", str(tmp_path), line_order=True)
    _check_contract(t)
    got = sorted((r.user_id, r.product_id, r.split, r.timestamp) for r in t["events"].collect())
    assert got == [
        ("7", "30", "train", 1), ("7", "31", "train", 2), ("7", "32", "train", 3),
        ("7", "40", "test", 4), ("7", "41", "test", 5),
        ("8", "5", "train", 1),
        ("9", "6", "test", 1),
    ]


@pytest.mark.parametrize(
    ("folder", "n_events", "n_purchase", "n_products"),
    [("movielens_1m", 5, 2, 4), ("movielens_25m", 4, 2, 4), ("movielens_100k", 6, 1, 3)],
)
def test_movielens(spark, folder, n_events, n_purchase, n_products):
    t = read_source(spark, "auto", str(FIX / folder))
    _check_contract(t)
    ev = t["events"].collect()
    assert len(ev) == n_events
    assert sum(r.event_type == "purchase" for r in ev) == n_purchase
    assert all(isinstance(r.timestamp, int) and r.timestamp > 8e8 for r in ev)
    products = {r.product_id: r for r in t["products"].collect()}
    assert len(products) == n_products
    if folder == "movielens_1m":
        assert products["661"].category == "Animation"
        assert products["661"].genres == "Animation|Children's|Musical"
        assert products["3409"].title == "Amélie (2001)"  # Latin-1 file
        assert {r.product_id for r in ev if r.event_type == "purchase"} == {"1193"}
    if folder == "movielens_25m":
        assert products["306"].title == "Three Colors: Red (Trois couleurs: Rouge) (1994)"
        assert products["131262"].category is None and products["131262"].title == "Innocence, The (2014)"
        assert {(r.user_id, r.event_type) for r in ev if r.product_id == "296"} == {
            ("1", "purchase"),
            ("2", "purchase"),
        }
    if folder == "movielens_100k":
        assert products["302"].category == "Crime" and products["302"].genres == "Crime|Film-Noir|Thriller"
        assert products["242"].category == "Comedy"


def test_gowalla_real_split(spark, shared_datasets):
    path = shared_datasets / "gowalla"
    if not (path / "train.txt").exists():
        pytest.skip(f"no Gowalla split at {path}")
    assert detect_source(path) == "lightgcn"
    t = read_source(spark, "auto", str(path))
    counts = {r.split: r["count"] for r in t["events"].groupBy("split").count().collect()}
    assert counts == {"train": 810_128, "test": 217_242}
    assert t["users"].count() == 29_858


def test_olist_real_catalog_files(spark, shared_datasets, tmp_path):
    """The real Olist catalog CSVs (quoted ids, BOM + CRLF translation) with the fixture's orders."""
    catalog = shared_datasets / "olist-catalog"
    if not (catalog / "olist_products_dataset.csv").exists():
        pytest.skip(f"no Olist catalog at {catalog}")
    for name in (
        "olist_products_dataset.csv",
        "olist_sellers_dataset.csv",
        "product_category_name_translation.csv",
    ):
        (tmp_path / name).symlink_to(catalog / name)
    for name in ("olist_orders_dataset.csv", "olist_order_items_dataset.csv", "olist_customers_dataset.csv"):
        (tmp_path / name).symlink_to(FIX / "olist" / name)
    t = read_source(spark, "auto", str(tmp_path))
    stats = (
        t["products"]
        .agg(
            F.count("*").alias("n"),
            F.count_distinct("category").alias("categories"),
            F.sum(F.col("category").isNull().cast("int")).alias("no_category"),
            F.max(F.when(F.col("product_id") == "1e9e8ef04dbcff4541ed26657ea517e5", F.col("category"))).alias(
                "first"
            ),
        )
        .first()
    )
    assert (stats.n, stats.categories, stats.no_category, stats.first) == (32_951, 73, 610, "perfumery")
    assert t["sellers"].where(F.col("region").isNotNull()).count() == 3_095


def test_lightgcn_in_line_order_prepares_line_ordered_histories(spark, tmp_path):
    """data.timestamps=order: val is the end of each line, histories are line prefixes in order,
    the test query sees the whole line, and nothing reads the positions as a clock."""
    import pyarrow.dataset as ds

    from data_pipelines import prepare
    from recsys.config import Config, DataConfig

    lines = [f"{u} " + " ".join(str(u * 100 + i) for i in range(10)) for u in range(1, 4)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.txt").write_text("1 199\n2 299\n")
    cfg = Config(data=DataConfig(split="predefined", val_fraction=0.2, val_carve="last", timestamps="order", max_history=20))
    tables = read_source(spark, "lightgcn", str(tmp_path), line_order=True)
    m = prepare.run(cfg, "adapter:lightgcn", str(tmp_path / "prepared"), tables=tables)
    assert m["split"]["timestamps"] == "order" and m["split"]["method"] == "predefined"
    vocab = {r["index"]: r["id"] for r in ds.dataset(str(tmp_path / "prepared/vocab/products.parquet")).to_table().to_pylist()}

    def rows(split):
        t = ds.dataset(str(tmp_path / "prepared/examples" / split), format="parquet").to_table().to_pylist()
        return [{**r, "p": vocab[r["product_idx"]], "h": [vocab[i] for i in r["hist_products"]]} for r in t]

    val, train, test = rows("val"), rows("train"), rows("test")
    assert sorted(r["p"] for r in val) == ["108", "109", "208", "209", "308", "309"]  # 0.2 of 10: the last two
    for r in train:  # each train item's history is the items before it in its line, oldest first
        u, i = divmod(int(r["p"]), 100)
        assert r["h"] == [str(u * 100 + j) for j in range(i)]
        assert (r["hour"], r["dow"]) == (-1, -1)
    assert {r["p"]: r["h"] for r in test} == {"199": [str(100 + j) for j in range(10)], "299": [str(200 + j) for j in range(10)]}
    feats = ds.dataset(str(tmp_path / "prepared/features/products.parquet")).to_table().to_pylist()
    assert all(f.get("log_pop_7d", 0.0) == 0.0 for f in feats)  # no popularity windows from positions


def test_recsys_prepare_reads_a_known_source_layout(spark, tmp_path, capsys):
    """`recsys prepare --data DIR` takes the same adapters as `recsys fit` (not only contract tables)."""
    import json

    from recsys.cli import main

    out = tmp_path / "prepared"
    rc = main(["prepare", "--data", str(FIX / "lightgcn"), "--out", str(out), "--set", "data.split=predefined"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["split"]["method"] == "predefined"
    assert m["n_users"] > 1 and m["n_products"] > 1
