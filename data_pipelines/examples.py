"""Training examples (one per positive event) with leak-free histories and context, and per-user histories.

Histories (``hist_products`` / ``hist_sellers``, oldest first, at most ``max_history``) use the
user's events of every type, restricted to the splits an example may see:

- train and val examples: train-split events; test examples: train and val events;
- with timestamps: only events strictly before the example's ts (ties excluded);
- without timestamps: the user's other events of those splits, a seeded random subset of at most
  ``max_history`` (different per example), never the example's own row.

Cost: each user's visible events are collected and sorted once (``array_sort`` on structs); the
position of every example in that list comes from one running-count window over examples and
events together; the history is then a ``slice`` of the list (O(max_history) per example).
Events with an unknown product (index 0) are left out of histories.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from data_pipelines.schema import EXAMPLE_COLUMNS
from data_pipelines.splits import uniform
from recsys.config import DataConfig

HISTORY_SPLITS = {"train": ("train",), "val": ("train",), "test": ("train", "val")}


def positives(ev: DataFrame, cfg: DataConfig, event_codes: dict[str, int]) -> DataFrame:
    """Positive events with a weight; unknown users or products (index 0) are dropped."""
    codes = [event_codes[t] for t in cfg.positive_events if t in event_codes]
    weight = F.lit(None).cast("float")
    for t, code in event_codes.items():
        weight = F.when(F.col("event") == code, F.lit(float(cfg.event_weights.get(t, 1.0)))).otherwise(weight)
    return ev.where(F.col("event").isin(*codes) if codes else F.lit(False)).select(
        "user_idx", "product_idx", "seller_idx", weight.cast("float").alias("weight"), "event", "ts", "rid", "split"
    )


def _order_key(has_ts: bool, seed: int) -> list[Column]:
    """The order of a user's events: time (then row hash); without time a seeded random order."""
    if has_ts:
        return [F.col("ts"), F.col("rid")]
    return [uniform(seed, F.col("rid")), F.col("rid")]


def _user_lists(events: DataFrame, has_ts: bool, seed: int, with_types: bool = False) -> DataFrame:
    """Per user: arrays ``hp`` (products), ``hs`` (sellers) [, ``ht`` (event codes)] in event order."""
    k1, k2 = _order_key(has_ts, seed)
    fields = [k1.alias("k1"), k2.alias("k2"), F.col("product_idx").alias("p"), F.col("seller_idx").alias("s")]
    if with_types:
        fields.append(F.col("event").cast("byte").alias("t"))
    g = events.groupBy("user_idx").agg(F.array_sort(F.collect_list(F.struct(*fields))).alias("_l"))
    cols = [
        "user_idx",
        F.transform("_l", lambda x: x["p"]).alias("hp"),
        F.transform("_l", lambda x: x["s"]).alias("hs"),
    ]
    if with_types:
        cols.append(F.transform("_l", lambda x: x["t"]).alias("ht"))
    return g.select(*cols)


def attach_history(
    examples: DataFrame, hist_events: DataFrame, has_ts: bool, max_history: int, seed: int, self_in_list: bool
) -> DataFrame:
    """Add ``hist_products`` and ``hist_sellers`` to ``examples`` from the users' ``hist_events``.

    Args:
        examples: rows with user_idx, ts, rid (and any other columns, kept).
        hist_events: the events these examples may see (user_idx, product_idx, seller_idx, ts, rid).
        has_ts: time-ordered histories strictly before ts, else random subsets of the other events.
        max_history: the cap.
        seed: for the order without time.
        self_in_list: the examples' own rows are among ``hist_events`` (only matters without time).
    """
    h = hist_events.where((F.col("product_idx") > 0) & (F.col("user_idx") > 0))
    lists = _user_lists(h, has_ts, seed)
    k1, k2 = _order_key(has_ts, seed)
    ex_cols = examples.columns
    ex = examples.select(*ex_cols, k1.alias("_k1"), k2.alias("_k2"), F.lit(0).alias("_e"))
    hv = h.select("user_idx", k1.alias("_k1"), k2.alias("_k2"), F.lit(1).alias("_e"))
    for c in ex_cols:
        if c not in hv.columns:
            hv = hv.withColumn(c, F.lit(None).cast(examples.schema[c].dataType))
    u = ex.unionByName(hv.select(*ex.columns))
    if has_ts:
        # examples sort before events at equal ts, so the running count is "events strictly before"
        order = [F.col("_k1"), F.col("_e")]
    else:
        # an example right after its own event (same keys), so pos counts itself when present
        order = [F.col("_k1"), F.col("_k2"), F.desc("_e")]
    w = Window.partitionBy("user_idx").orderBy(*order).rowsBetween(Window.unboundedPreceding, Window.currentRow)
    pos = u.withColumn("_pos", F.sum("_e").over(w)).where(F.col("_e") == 0).drop("_e", "_k1", "_k2")
    j = pos.join(lists, "user_idx", "left")
    empty = F.array().cast("array<int>")
    hp = F.coalesce(F.col("hp"), empty)
    hs = F.coalesce(F.col("hs"), empty)
    p = F.col("_pos").cast("int")
    H = int(max_history)
    if has_ts:
        start = F.greatest(p - H, F.lit(0)) + 1
        length = F.least(p, F.lit(H))
        out_p, out_s = F.slice(hp, start, length), F.slice(hs, start, length)
    else:
        own = 1 if self_in_list else 0
        n_after = F.greatest(F.least(F.size(hp) - p, F.lit(H)), F.lit(0))
        n_before = F.greatest(F.least(p - own, F.lit(H) - n_after), F.lit(0))
        out_p = F.concat(F.slice(hp, p + 1, F.greatest(n_after, F.lit(0))), F.slice(hp, 1, n_before))
        out_s = F.concat(F.slice(hs, p + 1, F.greatest(n_after, F.lit(0))), F.slice(hs, 1, n_before))
        if H == 0:
            out_p, out_s = empty, empty
    return j.select(*ex_cols, out_p.alias("hist_products"), out_s.alias("hist_sellers"))


def context(df: DataFrame, has_ts: bool) -> DataFrame:
    """``hour`` (0-23, UTC) and ``dow`` (0 = Monday .. 6 = Sunday) from ts; -1 without timestamps."""
    if not has_ts:
        return df.withColumn("hour", F.lit(-1).cast("byte")).withColumn("dow", F.lit(-1).cast("byte"))
    # arithmetic on epoch seconds: UTC whatever the session time zone (1970-01-01 was a Thursday)
    return df.withColumns(
        {
            "hour": F.pmod(F.floor(F.col("ts") / 3600), F.lit(24)).cast("byte"),
            "dow": F.pmod(F.floor(F.col("ts") / 86400) + 3, F.lit(7)).cast("byte"),
        }
    )


def build_examples(
    ev: DataFrame, cfg: DataConfig, has_ts: bool, event_codes: dict[str, int]
) -> dict[str, DataFrame]:
    """``{split: examples}`` with exactly EXAMPLE_COLUMNS (plus ``rid``, dropped before writing)."""
    pos = positives(ev, cfg, event_codes).where((F.col("user_idx") > 0) & (F.col("product_idx") > 0))
    out: dict[str, DataFrame] = {}
    for split, visible in HISTORY_SPLITS.items():
        ex = pos.where(F.col("split") == split).drop("split")
        hist_ev = ev.where(F.col("split").isin(*visible))
        ex = attach_history(ex, hist_ev, has_ts, cfg.max_history, cfg.seed, self_in_list=split in visible)
        ex = context(ex, has_ts)
        out[split] = ex.select(
            F.col("user_idx").cast("int"),
            F.col("product_idx").cast("int"),
            F.col("seller_idx").cast("int"),
            F.col("weight").cast("float"),
            F.col("event").cast("byte"),
            F.col("ts").cast("long"),
            F.col("hist_products").cast("array<int>"),
            F.col("hist_sellers").cast("array<int>"),
            "hour",
            "dow",
            "rid",
        )
        assert tuple(out[split].columns[:-1]) == EXAMPLE_COLUMNS
    return out


def user_histories(ev: DataFrame, has_ts: bool, max_len: int, seed: int) -> DataFrame:
    """Per user: ``products``, ``sellers``, ``types`` (event codes), oldest first, the last ``max_len``."""
    h = ev.where((F.col("product_idx") > 0) & (F.col("user_idx") > 0))
    lists = _user_lists(h, has_ts, seed, with_types=True)
    n = F.size("hp")
    start = F.greatest(n - int(max_len), F.lit(0)) + 1
    return lists.select(
        F.col("user_idx").cast("int"),
        F.slice("hp", start, int(max_len)).cast("array<int>").alias("products"),
        F.slice("hs", start, int(max_len)).cast("array<int>").alias("sellers"),
        F.slice("ht", start, int(max_len)).cast("array<tinyint>").alias("types"),
    )
