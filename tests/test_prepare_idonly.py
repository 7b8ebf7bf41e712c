"""Id-only data (no timestamps, no catalog) with a predefined train/test split, given as DataFrames
(the way the LightGCN/Gowalla adapter hands tables to ``prepare.run``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_pipelines import prepare
from recsys.config import Config, DataConfig

H = 3


@pytest.fixture(scope="module")
def idonly(spark, tmp_path_factory):
    rng = np.random.default_rng(11)
    rows = []
    for u in range(10):
        items = rng.choice(30, size=4 + u % 5, replace=False)
        for k, i in enumerate(items):
            rows.append((f"u{u}", f"i{i}", "test" if k == len(items) - 1 else "train"))
    src = pd.DataFrame(rows, columns=["user_id", "product_id", "split"])
    events = spark.createDataFrame(src)
    cfg = Config(data=DataConfig(max_history=H, val_fraction=0.3, rows_per_row_group=8))
    out = tmp_path_factory.mktemp("idonly") / "prepared"
    m = prepare.run(cfg, "adapter:lightgcn", str(out), tables={"events": events})
    return out, m, src


def test_manifest_says_no_time(idonly):
    out, m, src = idonly
    assert m["has_timestamps"] is False
    assert m["split"]["method"] == "predefined"
    assert any("temporal" in n for n in m["notes"])
    assert m["inputs"]["events"]["format"] == "dataframe"
    assert m["n_categories"] == 1 and m["n_brands"] == 1 and m["n_sellers"] == 1
    assert sum(m["rows"]["examples"].values()) == len(src)


def test_splits_and_histories(idonly):
    out, m, src = idonly
    users = pq.read_table(out / "vocab" / "users.parquet").to_pandas().set_index("index")["id"]
    items = pq.read_table(out / "vocab" / "products.parquet").to_pandas().set_index("index")["id"]
    ex = {
        s: pq.read_table(out / "examples" / s).to_pandas().assign(
            user_id=lambda d: d.user_idx.map(users), product_id=lambda d: d.product_idx.map(items)
        )
        for s in ("train", "val", "test")
    }
    orig = src.set_index(["user_id", "product_id"])["split"]
    # test = the predefined test rows; val only carved out of train, every user keeps a train row
    assert sorted(zip(ex["test"].user_id, ex["test"].product_id, strict=False)) == sorted(orig[orig == "test"].index)
    assert (orig.loc[list(zip(ex["val"].user_id, ex["val"].product_id, strict=False))] == "train").all()
    assert len(ex["val"]) > 0
    assert set(ex["train"].user_id) == set(src.user_id)
    for s, d in ex.items():
        assert (d.ts == 0).all() and (d.hour == -1).all() and (d.dow == -1).all()
        train_items = ex["train"].groupby("user_idx").product_idx.apply(set)
        val_items = ex["val"].groupby("user_idx").product_idx.apply(set)
        for r in d.itertuples():
            hist = list(r.hist_products)
            assert len(hist) <= H and len(set(hist)) == len(hist)
            allowed = set(train_items.get(r.user_idx, set()))
            if s == "test":
                allowed |= val_items.get(r.user_idx, set())
            assert set(hist) <= allowed
            assert r.product_idx not in hist  # never the example's own row
            expected = min(H, len(allowed - {r.product_idx}))
            assert len(hist) == expected
    h = pq.read_table(out / "histories" / "train.parquet").to_pandas().set_index("user_idx")
    for u, prods in h.products.items():
        assert set(prods) == set(ex["train"][ex["train"].user_idx == u].product_idx)
