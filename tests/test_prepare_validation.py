"""Raw contract reading and row-level validation (no full pipeline runs: fast)."""

from __future__ import annotations

import pandas as pd
import pytest

from data_pipelines.io import DataContractError, locate_table, read_tables
from data_pipelines.validation import epoch_col, id_col, validate_tables
from tests.test_prepare_common import make_raw


def _sdf(spark, pdf: pd.DataFrame):
    return spark.createDataFrame(pdf.astype(str).where(pdf.notna(), None))


def test_missing_required_column_names_table_file_and_column(spark, tmp_path):
    pd.DataFrame({"user_id": ["u1"], "item": ["p1"]}).to_csv(tmp_path / "events.csv", index=False)
    with pytest.raises(DataContractError) as e:
        read_tables(spark, str(tmp_path))
    msg = str(e.value)
    assert "'events'" in msg and "events.csv" in msg and "'product_id'" in msg


def test_missing_events_table_and_missing_offer_column(spark, tmp_path):
    with pytest.raises(DataContractError, match="no events table"):
        read_tables(spark, str(tmp_path))
    pd.DataFrame({"user_id": ["u1"], "product_id": ["p1"]}).to_csv(tmp_path / "events.csv", index=False)
    (tmp_path / "offers").mkdir()
    pd.DataFrame({"product_id": ["p1"]}).to_parquet(tmp_path / "offers" / "part-0.parquet")
    with pytest.raises(DataContractError) as e:
        read_tables(spark, str(tmp_path))
    assert "'offers'" in str(e.value) and "'seller_id'" in str(e.value) and "offers" in str(e.value)


def test_tab_semicolon_and_pipe_separated_tables_are_read(spark, tmp_path):
    pdf = pd.DataFrame({"user_id": ["u1", "u2"], "product_id": ["p1", "p,2"], "event_type": ["view", "buy"]})
    pdf.to_csv(tmp_path / "events.tsv", sep="\t", index=False)
    pdf[["product_id"]].assign(seller_id="s1").to_csv(tmp_path / "offers.csv", sep=";", index=False)
    (tmp_path / "sellers").mkdir()
    pd.DataFrame({"seller_id": ["s1"], "region": ["north"]}).to_csv(tmp_path / "sellers" / "part-0.csv", sep="|", index=False)
    tables, _ = read_tables(spark, str(tmp_path))
    assert sorted(tuple(r) for r in tables["events"].collect()) == [("u1", "p1", "view"), ("u2", "p,2", "buy")]
    assert tables["offers"].columns == ["product_id", "seller_id"] and tables["offers"].count() == 2
    assert [tuple(r) for r in tables["sellers"].collect()] == [("s1", "north")]


def test_locate_table_formats(tmp_path):
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "products.parquet")
    pd.DataFrame({"a": [1]}).to_csv(tmp_path / "events.csv", index=False)
    (tmp_path / "offers").mkdir()
    pd.DataFrame({"a": [1]}).to_csv(tmp_path / "offers" / "part-1.csv", index=False)
    assert locate_table(None, str(tmp_path), "products")[1] == "parquet"
    assert locate_table(None, str(tmp_path), "events")[1] == "csv"
    assert locate_table(None, str(tmp_path), "offers")[1] == "csv"
    assert locate_table(None, str(tmp_path), "users") is None


def test_timestamp_and_id_parsing(spark):
    from pyspark.sql import functions as F

    df = spark.createDataFrame(
        [("2020-01-01T00:00:00Z", 1.0), ("2020-01-01 00:00:01", 2.5), ("1577836802", None), ("1577836803.9", 7.0), ("x", None)],
        "t string, d double",
    )
    v, bad = epoch_col(F.col("t"), df.schema["t"].dataType)
    rows = df.select(v.alias("v"), bad.alias("bad"), id_col(F.col("d"), df.schema["d"].dataType).alias("id")).collect()
    assert [r["v"] for r in rows] == [1577836800, 1577836801, 1577836802, 1577836803, None]
    assert [r["bad"] for r in rows] == [False, False, False, False, True]
    assert [r["id"] for r in rows] == ["1", "2.5", None, "7", None]
    ts = spark.createDataFrame([(1,)], "x int").select(F.to_timestamp(F.lit("2020-01-01 00:00:00")).alias("t"))
    v, _ = epoch_col(F.col("t"), ts.schema["t"].dataType)
    assert ts.select(v).collect()[0][0] == 1577836800
    # epoch milliseconds, microseconds and nanoseconds are told from seconds by magnitude
    num = spark.createDataFrame([(1577836800123.0, "1577836800123"), (1577836801123456.0, "1577836801123456"),
                                 (1.5778368021e18, "1577836802100000000"), (86400.0, "86400")], "n double, s string")
    for col in ("n", "s"):
        v, bad = epoch_col(F.col(col), num.schema[col].dataType)
        got = [tuple(r) for r in num.select(v, bad).collect()]
        assert got == [(1577836800, False), (1577836801, False), (1577836802, False), (86400, False)], col


def test_rejected_accounting_invariant_every_reason(spark):
    raw = make_raw()
    tables = {k: _sdf(spark, v) for k, v in raw["tables"].items()}
    flagged, has_ts = validate_tables(tables)
    assert has_ts
    for name, fl in flagged.items():
        c = fl.counts()
        n_input = len(raw["tables"][name])
        assert c["input"] == n_input
        non_dup = sum(n for r, n in c["rejected"].items() if r != "duplicate")
        assert c["input"] == c["accepted"] + non_dup + c["duplicates"], name
        assert c["rejected"] == raw["expected_rejected"][name], name
        rej = fl.rejected().toPandas()
        assert len(rej) == sum(c["rejected"].values())
        assert set(rej["table"]) <= {name}
        # every original column is kept, as strings
        assert list(rej.columns) == list(raw["tables"][name].columns) + ["table", "reason"]
        assert fl.accepted().count() == c["accepted"]
    good = raw["good_events"]
    acc = flagged["events"].accepted().toPandas()
    assert len(acc) == len(good)
    assert sorted(acc["ts"]) == sorted(good["ts"])
    # missing event_type means purchase
    assert (acc["event_type"] == "purchase").sum() == (good["event_type"] == "purchase").sum()


def test_duplicate_key_in_catalog(spark):
    products = spark.createDataFrame([("p1", "10"), ("p1", "11"), ("p2", "3")], "product_id string, price string")
    events = spark.createDataFrame([("u", "p1")], "user_id string, product_id string")
    flagged, has_ts = validate_tables({"events": events, "products": products})
    assert not has_ts
    c = flagged["products"].counts()
    assert c == {"input": 3, "accepted": 2, "duplicates": 0, "rejected": {"duplicate_key": 1}}
    assert flagged["events"].counts()["accepted"] == 1


def test_split_column_accepts_train_val_test_and_rejects_others(spark):
    from data_pipelines.validation import flag_events

    pdf = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u2"], "product_id": ["p1", "p2", "p1", "p3"],
                        "split": ["train", " VAL ", "test", "holdout"]})
    f = flag_events(_sdf(spark, pdf), with_ts=False)
    assert f.counts()["rejected"] == {"bad_split": 1}
    assert sorted(r["split"] for r in f.accepted().collect()) == ["test", "train", "val"]
    assert [r["split"] for r in f.rejected().collect()] == ["holdout"]


def test_event_types_accept_common_other_names(spark):
    from data_pipelines.schema import EVENT_CODE
    from data_pipelines.validation import flag_events

    given = ["AddToCart", " transaction ", "page_view", "Add-to-Cart", "pv", "fav", "buy", "VIEW", "",
             "remove_from_cart", "refund"]
    pdf = pd.DataFrame({"user_id": [f"u{i}" for i in range(len(given))], "product_id": "p1", "event_type": given})
    f = flag_events(_sdf(spark, pdf), with_ts=False)
    assert f.counts()["rejected"] == {"unknown_event_type": 2}
    assert sorted(r["event_type"] for r in f.rejected().collect()) == ["refund", "remove_from_cart"]
    got = {r["user_id"]: r["event"] for r in f.accepted().collect()}
    want = ["cart", "purchase", "view", "cart", "view", "cart", "purchase", "view", "purchase"]
    assert got == {f"u{i}": EVENT_CODE[w] for i, w in enumerate(want)}
