"""Training examples (one per positive event) with leak-free histories and context, and per-user histories.

Histories (``hist_products`` / ``hist_sellers``, oldest first, at most ``max_history``) use the
user's events of every type, restricted to the splits an example may see:

- train and val examples: train-split events; test examples: train and val events;
- with timestamps: only events strictly before the example's ts (ties excluded);
- without timestamps: the user's other events of those splits, a seeded random subset of at most
  ``max_history`` (different per example), never the example's own row.

Cost: the events arrive partitioned by ``user_idx`` (``prepare`` repartitions them once), so
nothing here shuffles them again. Each user's events are collected and sorted once
(:func:`user_lists`), with their split; the train and train+val lists
are filtered from it once per user. One window over the events gives every example its position in
both lists (running counts of the visible events before it); the history is then a ``slice`` of the
list (O(max_history) per example). Events with an unknown product (index 0) are left out of
histories.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from data_pipelines.schema import EXAMPLE_COLUMNS
from data_pipelines.splits import uniform
from recsys.config import DataConfig


def _weight(cfg: DataConfig, event_codes: dict[str, int]) -> Column:
    """The example weight of each event type (float)."""
    weight = F.lit(None).cast("float")
    for t, code in event_codes.items():
        weight = F.when(F.col("event") == code, F.lit(float(cfg.event_weights.get(t, 1.0)))).otherwise(weight)
    return weight.cast("float")


def _is_positive(cfg: DataConfig, event_codes: dict[str, int]) -> Column:
    """True for events of the configured positive types."""
    codes = [event_codes[t] for t in cfg.positive_events if t in event_codes]
    return F.col("event").isin(*codes) if codes else F.lit(False)


def positives(ev: DataFrame, cfg: DataConfig, event_codes: dict[str, int]) -> DataFrame:
    """Positive events with a weight (rows with an unknown user or product, index 0, are kept: callers filter)."""
    return ev.where(_is_positive(cfg, event_codes)).select(
        "user_idx", "product_idx", "seller_idx", _weight(cfg, event_codes).alias("weight"), "event", "ts", "rid", "split"
    )


def _order_key(has_ts: bool, seed: int) -> list[Column]:
    """The order of a user's events: time (then row hash); without time a seeded random order."""
    if has_ts:
        return [F.col("ts"), F.col("rid")]
    return [uniform(seed, F.col("rid")), F.col("rid")]


SPLIT_CODE = {"train": 0, "val": 1, "test": 2}  # lists keep a split code per event: train+val = code <= 1


def user_lists(ev: DataFrame, has_ts: bool, seed: int) -> DataFrame:
    """Per user (``user_idx`` > 0): every event with a known product, in event order, as parallel arrays.

    Columns ``hp`` (products), ``hs`` (sellers), ``ht`` (event codes, int8), ``hv`` (split codes,
    :data:`SPLIT_CODE`, int8). The order keys are dropped once sorted: the cached lists hold
    10 bytes per event, not a struct row per event.
    """
    h = ev.where((F.col("product_idx") > 0) & (F.col("user_idx") > 0))
    k1, k2 = _order_key(has_ts, seed)
    v = F.lit(None).cast("byte")
    for name, code in SPLIT_CODE.items():
        v = F.when(F.col("split") == name, F.lit(code).cast("byte")).otherwise(v)
    fields = [
        k1.alias("k1"),
        k2.alias("k2"),
        F.col("product_idx").alias("p"),
        F.col("seller_idx").alias("s"),
        F.col("event").cast("byte").alias("t"),
        v.alias("v"),
    ]
    # array_sort: collect_list's order is not guaranteed (the aggregate may fall back to sorting);
    # on events that arrive in order (prepare caches them sorted) the sort is a linear pass
    g = h.groupBy("user_idx").agg(F.array_sort(F.collect_list(F.struct(*fields))).alias("_l"))
    return g.select("user_idx", *[F.transform("_l", _field(f)).alias("h" + f) for f in ("p", "s", "t", "v")])


def _field(name: str):
    """A one-argument lambda for ``F.transform`` (a default argument would make it take the index)."""
    return lambda e: e[name]


def _visible(arr: str, max_code: int | None) -> Column:
    """The elements of array column ``arr`` whose event is in a split with code <= ``max_code`` (all when None)."""
    if max_code is None:
        return F.col(arr)
    return F.filter(arr, lambda x, i: F.element_at(F.col("hv"), i + 1) <= max_code)


def _history(hp: Column, hs: Column, p: Column, has_ts: bool, max_history: int, own: int) -> tuple[Column, Column]:
    """The history of an example at position ``p`` of its user's visible lists ``hp`` / ``hs``.

    With time, ``p`` counts the visible events strictly before the example and the history is the
    last ``max_history`` of them. Without, ``p`` counts the visible events up to and including it
    in the seeded order (``own`` = 1 when the example itself is visible): the history takes the
    events after it, then wraps around to those before it, skipping its own row.
    """
    H = int(max_history)
    empty = F.array().cast("array<int>")
    if H == 0:
        return empty, empty
    if has_ts:
        start = F.greatest(p - H, F.lit(0)) + 1
        length = F.least(p, F.lit(H))
        return F.slice(hp, start, length), F.slice(hs, start, length)
    n_after = F.greatest(F.least(F.size(hp) - p, F.lit(H)), F.lit(0))
    n_before = F.greatest(F.least(p - own, F.lit(H) - n_after), F.lit(0))
    return (
        F.concat(F.slice(hp, p + 1, n_after), F.slice(hp, 1, n_before)),
        F.concat(F.slice(hs, p + 1, n_after), F.slice(hs, 1, n_before)),
    )


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
    ev: DataFrame, lists: DataFrame, cfg: DataConfig, has_ts: bool, event_codes: dict[str, int]
) -> DataFrame:
    """Examples of every split: EXAMPLE_COLUMNS plus ``rid`` and ``split``, in (user_idx, ts, rid) order within partitions.

    The order is what Spark produces, not a guarantee: the writer checks it
    (:func:`data_pipelines.part_files.split_batches`).

    Args:
        ev: indexed events with ``split`` (user_idx, product_idx, seller_idx, event, ts, rid, ...),
            ideally partitioned by user_idx.
        lists: :func:`user_lists` of ``ev``.
        cfg: the data config (positive events, weights, max_history, seed).
        has_ts: whether the events have timestamps.
        event_codes: event type -> code.
    """
    known = F.col("product_idx") > 0
    vis_t = (known & (F.col("split") == "train")).cast("int")
    vis_tv = (known & F.col("split").isin("train", "val")).cast("int")
    x = ev.where(F.col("user_idx") > 0)
    upto = (Window.unboundedPreceding, Window.currentRow)
    if has_ts:
        # (visible events up to this row in (ts, rid) order) - (those with this row's ts up to it)
        # = visible events strictly before ts. Both windows read the rows in (user_idx, ts, rid)
        # order: the order prepare caches the events in (no sort) and writes the examples in.
        w_upto = Window.partitionBy("user_idx").orderBy("ts", "rid").rangeBetween(*upto)
        w_tie = Window.partitionBy("user_idx", "ts").orderBy("rid").rangeBetween(*upto)
        x = x.select(
            "*",
            (F.sum(vis_t).over(w_upto) - F.sum(vis_t).over(w_tie)).alias("_pt"),
            (F.sum(vis_tv).over(w_upto) - F.sum(vis_tv).over(w_tie)).alias("_ptv"),
        )
    else:
        # a range frame to the current row counts the row and its peers (equal keys): deterministic
        k1, k2 = _order_key(has_ts, seed=cfg.seed)
        w = Window.partitionBy("user_idx").orderBy(k1, k2).rangeBetween(*upto)
        x = x.select("*", F.sum(vis_t).over(w).alias("_pt"), F.sum(vis_tv).over(w).alias("_ptv"))
    pos = x.where(known & _is_positive(cfg, event_codes))
    # the train and train+val lists, filtered once per user (not once per example)
    train, trainval = SPLIT_CODE["train"], SPLIT_CODE["val"]
    vis = lists.select(
        "user_idx",
        _visible("hp", train).alias("_hpt"),
        _visible("hs", train).alias("_hst"),
        _visible("hp", trainval).alias("_hptv"),
        _visible("hs", trainval).alias("_hstv"),
    )
    j = pos.join(vis, "user_idx", "left")
    empty = F.array().cast("array<int>")
    is_test = F.col("split") == "test"
    hp = F.coalesce(F.when(is_test, F.col("_hptv")).otherwise(F.col("_hpt")), empty)
    hs = F.coalesce(F.when(is_test, F.col("_hstv")).otherwise(F.col("_hst")), empty)
    p = F.when(is_test, F.col("_ptv")).otherwise(F.col("_pt")).cast("int")
    # only train examples are among their own visible events (train and val see train, test train+val)
    own = (F.col("split") == "train").cast("int")
    hist_p, hist_s = _history(hp, hs, p, has_ts, cfg.max_history, own)
    ex = context(j.select("*", hist_p.alias("hist_products"), hist_s.alias("hist_sellers")), has_ts)
    out = ex.select(
        F.col("user_idx").cast("int"),
        F.col("product_idx").cast("int"),
        F.col("seller_idx").cast("int"),
        _weight(cfg, event_codes).alias("weight"),
        F.col("event").cast("byte"),
        F.col("ts").cast("long"),
        F.col("hist_products").cast("array<int>"),
        F.col("hist_sellers").cast("array<int>"),
        "hour",
        "dow",
        "rid",
        "split",
    )
    assert tuple(out.columns[:-2]) == EXAMPLE_COLUMNS
    # With time the rows are already in (user_idx, ts, rid) order within each partition (the
    # window's sort; the join streams them in order). Without, the window's order is random.
    return out if has_ts else out.sortWithinPartitions("user_idx", "ts", "rid")


def user_histories(lists: DataFrame, max_code: int | None, max_len: int) -> DataFrame:
    """Per user with events in the visible splits: ``products``, ``sellers``, ``types``, oldest first, the last ``max_len``.

    Args:
        lists: :func:`user_lists`.
        max_code: the splits to keep (:data:`SPLIT_CODE` <= max_code), None for all.
        max_len: the cap.
    """
    v = lists.select("user_idx", *[_visible(c, max_code).alias(c) for c in ("hp", "hs", "ht")]).where(F.size("hp") > 0)
    n = F.size("hp")
    start = F.greatest(n - int(max_len), F.lit(0)) + 1
    return v.select(
        F.col("user_idx").cast("int"),
        F.slice("hp", start, int(max_len)).cast("array<int>").alias("products"),
        F.slice("hs", start, int(max_len)).cast("array<int>").alias("sellers"),
        F.slice("ht", start, int(max_len)).cast("array<tinyint>").alias("types"),
    )
