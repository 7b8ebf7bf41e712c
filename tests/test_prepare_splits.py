"""Split methods on typed events (``data_pipelines.splits``), without the full pipeline."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
from pyspark.sql import functions as F

from data_pipelines.splits import assign_splits, resolve_method, temporal_problem
from recsys.config import DataConfig

POS = [0, 1, 2]  # every event type is a positive


def _events(spark, with_split: bool = False):
    rows = []
    rid = 0
    for u in range(8):
        n = 2 + u * 2  # 2..16 events per user
        for i in range(n):
            rid += 1
            split = ("test" if i >= n - 2 else "train") if with_split else None
            rows.append((f"u{u}", 2 if i % 3 else 0, 1000 * (i + 1) + u, rid * 7919, split))
    schema = "user_id string, event int, ts long, rid long, split string"
    df = spark.createDataFrame(rows, schema).withColumn("event", F.col("event").cast("byte"))
    return df if with_split else df.drop("split")


def _run(spark, cfg, with_split=False, has_ts=True, positive=POS):
    out, info = assign_splits(_events(spark, with_split), cfg, has_ts, positive)
    return out.toPandas(), info


def test_resolve_method():
    assert resolve_method("auto", True, True) == "predefined"
    assert resolve_method("auto", False, True) == "temporal"
    assert resolve_method("auto", False, False) == "random"
    # order-only timestamps: no shared clock to cut at, so auto orders each user's events instead
    assert resolve_method("auto", False, True, has_clock=False) == "leave_last_out"
    with pytest.raises(ValueError, match="data.timestamps=order"):
        resolve_method("temporal", False, True, has_clock=False)
    with pytest.raises(ValueError, match="timestamps"):
        resolve_method("temporal", False, False)
    with pytest.raises(ValueError, match="split"):
        resolve_method("predefined", False, True)
    with pytest.raises(ValueError, match="unknown"):
        resolve_method("bogus", False, True)


def test_temporal_cutoffs(spark):
    cfg = DataConfig(split="temporal", val_fraction=0.2, test_fraction=0.2)
    df, info = _run(spark, cfg)
    cut = info["cutoffs"]
    assert info["method"] == "temporal" and info["has_timestamps"]
    assert cut["val_cutoff"] < cut["test_cutoff"]
    assert df[df.split == "train"].ts.max() < df[df.split == "val"].ts.min()
    assert df[df.split == "val"].ts.max() < df[df.split == "test"].ts.min()
    frac = df.split.value_counts(normalize=True)
    assert 0.1 < frac["test"] < 0.3 and 0.1 < frac["val"] < 0.3

    shares = cut["positive_shares"]  # the shares the cutoffs gave, counted over the positives
    assert shares == pytest.approx({k: float((df.split == k).mean()) for k in ("train", "val", "test")}, abs=1e-6)


def test_coarse_timestamps_fall_back_to_a_random_split_or_fail_clearly(spark):
    one_day = _events(spark).withColumn("ts", F.lit(1_704_067_200).cast("long"))  # every event on one date
    cfg = DataConfig(split="auto", val_fraction=0.2, test_fraction=0.2)
    out, info = assign_splits(one_day, cfg, True, POS)
    df = out.toPandas()
    # time cutoffs would put every positive in test: auto splits each user at random instead, and says so
    assert info["method"] == "random" and info["requested"] == "auto" and "cutoffs" not in info
    assert info["rejected_cutoffs"]["positive_shares"] == {"train": 0.0, "val": 0.0, "test": 1.0}
    assert "test 100.0%" in info["fallback"]
    frac = df.split.value_counts(normalize=True)
    assert 0.1 < frac["test"] < 0.35 and 0.1 < frac["val"] < 0.35
    assert all((g.split == "train").sum() >= 1 for _, g in df.groupby("user_id"))
    with pytest.raises(ValueError, match=r"data.split=temporal: .*train 0.0%, val 0.0%, test 100.0%"):
        assign_splits(one_day, replace(cfg, split="temporal"), True, POS)


def test_temporal_problem_thresholds():
    cfg = DataConfig(val_fraction=0.1, test_fraction=0.1)  # intended train share 80%
    assert temporal_problem({"train": 0.8, "val": 0.1, "test": 0.1}, cfg) is None
    assert temporal_problem({"train": 0.41, "val": 0.29, "test": 0.3}, cfg) is None  # a coarse but usable cut
    assert "intended train share of 80%" in temporal_problem({"train": 0.39, "val": 0.31, "test": 0.3}, cfg)
    assert "between the val and test" in temporal_problem({"train": 0.9, "val": 0.0, "test": 0.1}, cfg)
    assert "at or after the test cutoff" in temporal_problem({"train": 0.9, "val": 0.1, "test": 0.0}, cfg)
    no_val = DataConfig(val_fraction=0.0, test_fraction=0.1)
    assert temporal_problem({"train": 0.9, "val": 0.0, "test": 0.1}, no_val) is None


def test_leave_last_out(spark):
    df, info = _run(spark, DataConfig(split="leave_last_out"), positive=[2])
    assert info["method"] == "leave_last_out"
    for _u, g in df.groupby("user_id"):
        pos = g[g.event == 2].sort_values("ts")
        if len(pos) < 3:
            assert (g.split == "train").all()
            continue
        assert pos.iloc[-1].split == "test" and pos.iloc[-2].split == "val"
        assert (pos.iloc[:-2].split == "train").all()
        # non-positive events follow time: after the val target they are not train
        val_ts = pos.iloc[-2].ts
        assert (g[g.ts < val_ts].split == "train").all()
        assert (g[g.ts > val_ts].split != "train").all()


def test_predefined_val_from_train_only(spark):
    cfg = DataConfig(split="predefined", val_fraction=0.3, seed=5)
    src = _events(spark, with_split=True).toPandas()
    df, info = _run(spark, cfg, with_split=True)
    assert info["method"] == "predefined"
    m = df.merge(src[["rid", "split"]], on="rid", suffixes=("", "_orig"))
    assert len(m) == len(src)
    # test rows are exactly the predefined test rows; val only from train
    assert (m[m.split_orig == "test"].split == "test").all()
    assert set(m[m.split_orig == "train"].split) <= {"train", "val"}
    assert (m.split == "val").sum() > 0
    for _, g in m[m.split_orig == "train"].groupby("user_id"):
        assert (g.split == "train").sum() >= 1
    again, _ = _run(spark, cfg, with_split=True)
    pd.testing.assert_frame_equal(df.sort_values("rid").reset_index(drop=True), again.sort_values("rid").reset_index(drop=True))
    other, _ = _run(spark, replace(cfg, seed=6), with_split=True)
    assert not other.sort_values("rid").split.reset_index(drop=True).equals(df.sort_values("rid").split.reset_index(drop=True))


def test_predefined_keeps_given_val_rows(spark):
    src = _events(spark, with_split=True).toPandas()
    # the last train row of each user with at least 6 rows is given as val
    last_train = src[src.split == "train"].groupby("user_id").rid.max()
    big = src.groupby("user_id").size() >= 6
    given = set(last_train[big[last_train.index]].values)
    src.loc[src.rid.isin(given), "split"] = "val"
    ev = spark.createDataFrame(src).withColumn("event", F.col("event").cast("byte"))
    out, info = assign_splits(ev, DataConfig(split="predefined", val_fraction=0.0), True, POS)
    got = out.toPandas().merge(src[["rid", "split"]], on="rid", suffixes=("", "_orig"))
    assert info["method"] == "predefined" and len(got) == len(src)
    assert (got.split == got.split_orig).all()  # val_fraction 0: exactly the given split
    out, _ = assign_splits(ev, DataConfig(split="predefined", val_fraction=0.3, seed=5), True, POS)
    got = out.toPandas().merge(src[["rid", "split"]], on="rid", suffixes=("", "_orig"))
    assert (got[got.split_orig == "val"].split == "val").all() and (got[got.split_orig == "test"].split == "test").all()
    assert (got[got.split_orig == "train"].split == "val").sum() > 0  # carved on top of the given rows


def test_val_carve_last_takes_each_users_latest_positives(spark):
    df, info = _run(spark, DataConfig(split="random", val_fraction=0.2, test_fraction=0.2, val_carve="last"))
    assert info["val_carve"] == "last"
    for _, g in df.groupby("user_id"):
        g = g.sort_values("ts")
        order = {"train": 0, "val": 1, "test": 2}
        assert g.split.map(order).is_monotonic_increasing  # train, then val, then test, in time
    assert (df.split == "val").sum() > 0 and (df.split == "test").sum() > 0
    pre, _ = _run(spark, DataConfig(split="predefined", val_fraction=0.3, val_carve="last"), with_split=True)
    for _, g in pre[pre.split != "test"].groupby("user_id"):
        g = g.sort_values("ts")
        assert g.split.map({"train": 0, "val": 1}).is_monotonic_increasing
    # without timestamps there is no order: only a predefined split's given val rows
    with pytest.raises(ValueError, match="val_carve=last"):
        _run(spark, DataConfig(split="random", val_carve="last"), has_ts=False)
    nots, info = _run(spark, DataConfig(split="predefined", val_fraction=0.3, val_carve="last"), with_split=True, has_ts=False)
    assert set(nots.split) == {"train", "test"} and info["val_fraction"] == 0.0
    with pytest.raises(ValueError, match="val_carve"):
        _run(spark, DataConfig(split="random", val_carve="first"))


def test_random_split_without_timestamps(spark):
    cfg = DataConfig(split="auto", val_fraction=0.2, test_fraction=0.2)
    df, info = _run(spark, cfg, has_ts=False)
    assert info["method"] == "random" and not info["has_timestamps"] and "note" in info
    for _, g in df.groupby("user_id"):
        assert (g.split == "train").sum() >= 1
    frac = df.split.value_counts(normalize=True)
    assert 0.1 < frac["test"] < 0.35 and 0.1 < frac["val"] < 0.35


@pytest.mark.parametrize("rel_err", [1e-4, 0.05])
def test_exact_quantiles_known_answer_in_any_row_order(spark, rel_err: float) -> None:
    import math

    import numpy as np

    from data_pipelines.splits import exact_quantiles

    rng = np.random.default_rng(3)
    vals = np.concatenate([rng.integers(0, 500, 3000), np.full(400, 250)])  # many ties at one value
    qs = [0.0, 0.1, 0.5, 0.8, 0.9, 0.97, 1.0]
    srt = np.sort(vals)
    want = [int(srt[max(1, math.ceil(q * len(vals))) - 1]) for q in qs]
    df = spark.createDataFrame([(int(v),) for v in vals], "ts long")
    for seed in (1, 2):  # the same rows in two different partition orders
        shuffled = df.repartition(7).orderBy(F.rand(seed)).repartition(5)
        assert [int(v) for v in exact_quantiles(shuffled, "ts", qs, rel_err)] == want
    assert exact_quantiles(df.where("ts < 0"), "ts", [0.5]) == [None]
