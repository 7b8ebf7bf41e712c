"""Training examples (one per positive event) with leak-free histories and context, and per-user histories.

Histories (``hist_products`` / ``hist_sellers``, oldest first, at most ``max_history``) use the
user's events of every type, restricted to the splits an example may see:

- train and val examples: train-split events; test examples: train and val events;
- with timestamps: only events strictly before the example's ts (ties excluded);
- without timestamps: the user's other events of those splits, a seeded random subset of at most
  ``max_history`` (different per example), never the example's own row.

Cost: the events arrive partitioned by ``user_idx`` (``prepare`` repartitions them once), so
nothing here shuffles them again. Spark collects and sorts each user's events once
(:func:`user_lists`: parallel primitive arrays, about 26 bytes per event); the examples are then
built from those lists in numpy, one Arrow batch of users at a time, inside the task that writes
them (:func:`examples_from_lists`): prefix counts give every example its position in the visible
lists, and its history is a gather of at most ``max_history`` elements. Spark's own window,
join and array slicing over the same rows cost more than twice as much, most of it moving the
per-example history arrays (about 40 values per example) from the JVM to Python.
Events with an unknown product (index 0) are left out of histories and examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from data_pipelines.schema import EXAMPLE_COLUMNS, SPLITS
from data_pipelines.splits import uniform
from recsys.config import DataConfig

EXAMPLE_ARROW_SCHEMA = pa.schema(
    [
        ("user_idx", pa.int32()),
        ("product_idx", pa.int32()),
        ("seller_idx", pa.int32()),
        ("weight", pa.float32()),
        ("event", pa.int8()),
        ("ts", pa.int64()),
        ("hist_products", pa.list_(pa.int32())),
        ("hist_sellers", pa.list_(pa.int32())),
        ("hour", pa.int8()),
        ("dow", pa.int8()),
    ]
)
assert tuple(EXAMPLE_ARROW_SCHEMA.names) == EXAMPLE_COLUMNS

SPLIT_CODE = {"train": 0, "val": 1, "test": 2}  # lists keep a split code per event: train+val = code <= 1
assert tuple(SPLIT_CODE) == SPLITS


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


def user_lists(ev: DataFrame, has_ts: bool, seed: int) -> DataFrame:
    """Per user (``user_idx`` > 0): every event with a known product, in event order, as parallel arrays.

    Columns ``hp`` (products), ``hs`` (sellers), ``ht`` (event codes, int8), ``hv`` (split codes,
    :data:`SPLIT_CODE`, int8), ``hr`` (row hashes, the ``rid`` of each event) and, with
    timestamps, ``hts`` (epoch seconds). Primitive arrays, not a struct per event: the cached lists
    hold 26 bytes per event (10 without ``hr`` / ``hts``, which only the examples read).
    """
    h = ev.where((F.col("product_idx") > 0) & (F.col("user_idx") > 0))
    k1, k2 = _order_key(has_ts, seed)
    v = F.lit(None).cast("byte")
    for name, code in SPLIT_CODE.items():
        v = F.when(F.col("split") == name, F.lit(code).cast("byte")).otherwise(v)
    fields = [
        k1.alias("k1"),
        k2.alias("r"),
        F.col("product_idx").alias("p"),
        F.col("seller_idx").alias("s"),
        F.col("event").cast("byte").alias("t"),
        v.alias("v"),
    ]
    # array_sort: collect_list's order is not guaranteed (the aggregate may fall back to sorting);
    # on events that arrive in order (prepare caches them sorted) the sort is a linear pass
    g = h.groupBy("user_idx").agg(F.array_sort(F.collect_list(F.struct(*fields))).alias("_l"))
    out = [F.transform("_l", _field(f)).alias("h" + f) for f in ("p", "s", "t", "v", "r")]
    if has_ts:
        out.append(F.transform("_l", _field("k1")).alias("hts"))
    return g.select("user_idx", *out)


def _field(name: str):
    """A one-argument lambda for ``F.transform`` (a default argument would make it take the index)."""
    return lambda e: e[name]


def _visible(arr: str, max_code: int | None) -> Column:
    """The elements of array column ``arr`` whose event is in a split with code <= ``max_code`` (all when None)."""
    if max_code is None:
        return F.col(arr)
    return F.filter(arr, lambda x, i: F.element_at(F.col("hv"), i + 1) <= max_code)


@dataclass(frozen=True)
class ExampleSpec:
    """What :func:`examples_from_lists` needs from the config (small and picklable: it ships to the tasks).

    Attributes:
        has_ts: whether the lists carry ``hts`` (time order) or are in a seeded random order.
        max_history: the longest history.
        positive_codes: event codes that make an example.
        weights: the example weight of each event code (index = code).
    """

    has_ts: bool
    max_history: int
    positive_codes: tuple[int, ...]
    weights: tuple[float, ...]

    @classmethod
    def from_config(cls, cfg: DataConfig, has_ts: bool, event_codes: dict[str, int]) -> ExampleSpec:
        weights = [1.0] * (max(event_codes.values()) + 1)
        for t, code in event_codes.items():
            weights[code] = float(cfg.event_weights.get(t, 1.0))
        codes = tuple(sorted(event_codes[t] for t in cfg.positive_events if t in event_codes))
        return cls(bool(has_ts), int(cfg.max_history), codes, tuple(weights))


def _flat(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """A list column's values, concatenated in row order (respects a sliced batch)."""
    return batch.column(name).flatten().to_numpy(zero_copy_only=False)


def _slice_index(
    s1: np.ndarray, n1: np.ndarray, s2: np.ndarray | None = None, n2: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and gather indexes of the lists ``values[s1:s1+n1] ++ values[s2:s2+n2]``, one per row.

    Args:
        s1, n1: (E,) start and length of each row's first slice.
        s2, n2: (E,) the optional second slice.

    Returns:
        ``(offsets (E+1,) int32, idx (sum of lengths,) int64)``: row i is ``values[idx[offsets[i]:offsets[i+1]]]``.
    """
    n = n1 if n2 is None else n1 + n2
    offsets = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(n, out=offsets[1:])
    if n2 is None:
        idx = np.repeat(s1 - offsets[:-1], n) + np.arange(offsets[-1], dtype=np.int64)
    else:
        rel = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], n)
        first = np.repeat(n1, n)
        idx = np.where(rel < first, np.repeat(s1, n) + rel, np.repeat(s2, n) + rel - first)
    return offsets.astype(np.int32), idx


def examples_from_lists(batch: pa.RecordBatch, spec: ExampleSpec) -> list[pa.RecordBatch]:
    """The examples of a batch of users, one batch per split: EXAMPLE_COLUMNS plus ``rid`` and ``split``.

    Args:
        batch: rows of :func:`user_lists` (``user_idx``, ``hp``, ``hs``, ``ht``, ``hv``, ``hr``
            [, ``hts``]), users in ascending ``user_idx`` order, each list in the user's event order.
        spec: the example settings.

    Returns:
        One row per event whose code is in ``spec.positive_codes``, with its leak-free history
        (see the module docstring), weight and context: a batch for each split with examples
        (train, val, test order), its rows in (user_idx, ts, rid) order.
    """
    users = batch.column("user_idx").to_numpy(zero_copy_only=False)
    lens = pc.list_value_length(batch.column("hp")).to_numpy(zero_copy_only=False).astype(np.int64)
    prod, sell = _flat(batch, "hp"), _flat(batch, "hs")
    etype, split, rid = _flat(batch, "ht"), _flat(batch, "hv"), _flat(batch, "hr")
    n = len(prod)
    ts = _flat(batch, "hts") if spec.has_ts else np.zeros(n, dtype=np.int64)
    if not (len(sell) == len(etype) == len(split) == len(rid) == len(ts) == int(lens.sum())):
        raise ValueError("user lists of one row differ in length")
    seg = np.repeat(np.arange(len(users)), lens)  # the row (user) of each event
    first = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lens, out=first[1:])  # each user's first event; first[-1] = n
    # Exclusive prefix counts of the visible events: c[i] = visible events before position i.
    # Both visible lists are stored back to back in one array, train first, then train+val.
    vis_t, vis_tv = split == SPLIT_CODE["train"], split <= SPLIT_CODE["val"]
    c_t = np.concatenate([[0], np.cumsum(vis_t, dtype=np.int64)])
    c_tv = np.concatenate([[0], np.cumsum(vis_tv, dtype=np.int64)])
    c_tv_shifted = c_tv + c_t[-1]
    vis_p = np.concatenate([prod[vis_t], prod[vis_tv]])
    vis_s = np.concatenate([sell[vis_t], sell[vis_tv]])

    ex = np.flatnonzero(np.isin(etype, np.asarray(spec.positive_codes, dtype=etype.dtype)))
    # grouped by split, then in (user_idx, ts, rid) order: without time the lists are in a seeded
    # random order, so the examples are sorted by rid (ts is 0)
    ex = ex[np.lexsort((rid[ex], seg[ex], split[ex]))] if not spec.has_ts else ex[np.argsort(split[ex], kind="stable")]
    u = seg[ex]
    is_test = split[ex] == SPLIT_CODE["test"]
    lo = np.where(is_test, c_tv_shifted[first[u]], c_t[first[u]])  # the user's visible list: [lo, hi)
    hi = np.where(is_test, c_tv_shifted[first[u + 1]], c_t[first[u + 1]])
    H = int(spec.max_history)
    if spec.has_ts:
        # the visible events strictly before ts: those before the first event of the example's
        # (user, ts) tie group
        new = np.ones(n, dtype=bool)
        new[1:] = (ts[1:] != ts[:-1]) | (seg[1:] != seg[:-1])
        tie = np.maximum.accumulate(np.where(new, np.arange(n), 0))[ex]
        end = np.where(is_test, c_tv_shifted[tie], c_t[tie])
        k = np.minimum(end - lo, H)
        offsets, idx = _slice_index(end - k, k)
    else:
        # p = visible events up to and including the example; the history takes the events after
        # it, then wraps around to those before it, skipping the example's own row (train only)
        p = np.where(is_test, c_tv_shifted[ex + 1], c_t[ex + 1]) - lo
        own = (split[ex] == SPLIT_CODE["train"]).astype(np.int64)
        n_after = np.clip(np.minimum(hi - lo - p, H), 0, None)
        n_before = np.clip(np.minimum(p - own, H - n_after), 0, None)
        offsets, idx = _slice_index(lo + p, n_after, lo, n_before)
    pa_offsets = pa.array(offsets)
    hist_p = pa.ListArray.from_arrays(pa_offsets, pa.array(vis_p[idx].astype(np.int32, copy=False)))
    hist_s = pa.ListArray.from_arrays(pa_offsets, pa.array(vis_s[idx].astype(np.int32, copy=False)))
    ex_ts = ts[ex]
    if spec.has_ts:
        hour, dow = (ex_ts // 3600) % 24, (ex_ts // 86400 + 3) % 7  # 1970-01-01 was a Thursday
    else:
        hour = dow = np.full(len(ex), -1)
    codes = etype[ex]
    cols = {
        "user_idx": pa.array(users[u].astype(np.int32)),
        "product_idx": pa.array(prod[ex].astype(np.int32)),
        "seller_idx": pa.array(sell[ex].astype(np.int32)),
        "weight": pa.array(np.asarray(spec.weights, dtype=np.float32)[codes]),
        "event": pa.array(codes.astype(np.int8)),
        "ts": pa.array(ex_ts.astype(np.int64)),
        "hist_products": hist_p,
        "hist_sellers": hist_s,
        "hour": pa.array(hour.astype(np.int8)),
        "dow": pa.array(dow.astype(np.int8)),
        "rid": pa.array(rid[ex].astype(np.int64)),
        "split": pc.take(pa.array(SPLITS), pa.array(split[ex].astype(np.int8))),
    }
    schema = pa.schema([*EXAMPLE_ARROW_SCHEMA, ("rid", pa.int64()), ("split", pa.string())])
    out = pa.RecordBatch.from_arrays(list(cols.values()), schema=schema)
    ends = np.cumsum(np.bincount(split[ex], minlength=len(SPLITS)))
    starts = np.concatenate([[0], ends[:-1]])
    return [out.slice(int(a), int(b - a)) for a, b in zip(starts, ends, strict=True) if b > a]


def example_batches(spec: ExampleSpec):
    """A ``batches -> batches`` function mapping :func:`user_lists` batches to example batches (for ``mapInArrow``)."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            if b.num_rows:
                yield from examples_from_lists(b, spec)

    return run


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
