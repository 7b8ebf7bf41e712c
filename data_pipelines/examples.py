"""Training examples (one per positive event) with leak-free histories and context.

Histories (``hist_products`` / ``hist_sellers``, oldest first, at most ``max_history``) use the
user's events of every type, restricted to the splits an example may see:

- train and val examples: train-split events; test examples: train and val events;
- with timestamps: only events strictly before the example's ts (ties excluded);
- without timestamps: the user's other events of those splits, a seeded random subset of at most
  ``max_history`` (different per example), never the example's own row.

The examples are built in numpy from each user's events (:mod:`data_pipelines.user_events`)
inside the task that writes them: prefix counts give every example its position in the visible
events, and its history is a gather of at most ``max_history`` of them. Events with an unknown
user or product (index 0) make no example and are left out of histories.
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
from data_pipelines.splits import is_positive
from data_pipelines.user_events import SPLIT_CODE, UserEvents, list_array, whole_users
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
# Dictionary-encoded columns of the example files: the few-valued ones. Ids and histories are
# stored plain: their dictionaries overflow anyway, and writing 1M examples took 0.63 s instead of
# 1.02 s, in smaller files (30 vs 36 MB), read as fast.
EXAMPLE_DICTIONARY = ("seller_idx", "weight", "event", "hour", "dow")
# what examples_from_events yields: the example columns, plus what the split writer routes and checks by
BUILT_SCHEMA = pa.schema([*EXAMPLE_ARROW_SCHEMA, ("rid", pa.int64()), ("split", pa.string())])


def weights_by_code(cfg: DataConfig, event_codes: dict[str, int]) -> tuple[float, ...]:
    """The example weight of each event code (index = code): ``cfg.event_weights``, 1.0 when unset."""
    weights = [1.0] * (max(event_codes.values()) + 1)
    for t, code in event_codes.items():
        weights[code] = float(cfg.event_weights.get(t, 1.0))
    return tuple(weights)


def event_weight(cfg: DataConfig, event_codes: dict[str, int]) -> Column:
    """The example weight of each row's event code (:func:`weights_by_code`), a double column."""
    weight = F.lit(None).cast("double")
    for code, w in enumerate(weights_by_code(cfg, event_codes)):
        weight = F.when(F.col("event") == code, F.lit(w)).otherwise(weight)
    return weight


def positive_codes(cfg: DataConfig, event_codes: dict[str, int]) -> tuple[int, ...]:
    """The event codes of ``cfg.positive_events`` (the types that make a training example), ascending."""
    return tuple(sorted(event_codes[t] for t in cfg.positive_events if t in event_codes))


def positives(ev: DataFrame, cfg: DataConfig, event_codes: dict[str, int]) -> DataFrame:
    """Positive events with a weight (rows with an unknown user or product, index 0, are kept: callers filter)."""
    return ev.where(is_positive(positive_codes(cfg, event_codes))).select(
        "user_idx", "product_idx", "seller_idx", event_weight(cfg, event_codes).cast("float").alias("weight"), "event", "ts", "rid", "split"
    )


@dataclass(frozen=True)
class ExampleSpec:
    """What :func:`examples_from_events` needs from the config (small and picklable: it ships to the tasks).

    Attributes:
        has_ts: whether events are in time order (else a seeded random order).
        max_history: the longest history.
        positive_codes: event codes that make an example.
        weights: the example weight of each event code (index = code).
        has_clock: whether the timestamps are times (hour and day-of-week context) rather than
            only an order (``data.timestamps`` = order: the context is unknown, -1).
    """

    has_ts: bool
    max_history: int
    positive_codes: tuple[int, ...]
    weights: tuple[float, ...]
    has_clock: bool = True

    @classmethod
    def from_config(cls, cfg: DataConfig, has_ts: bool, event_codes: dict[str, int]) -> ExampleSpec:
        return cls(
            bool(has_ts), int(cfg.max_history), positive_codes(cfg, event_codes), weights_by_code(cfg, event_codes),
            bool(has_ts) and cfg.timestamps == "time",
        )


def slice_index(
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


def examples_from_events(e: UserEvents, spec: ExampleSpec) -> list[pa.RecordBatch]:
    """The examples of a chunk of whole users, one batch per split: :data:`BUILT_SCHEMA`.

    Args:
        e: the users' events, in event order.
        spec: the example settings.

    Returns:
        One row per event whose code is in ``spec.positive_codes``, with its leak-free history
        (see the module docstring), weight and context: a batch for each split with examples
        (train, val, test order), its rows in (user_idx, ts, rid) order.
    """
    n, split, first = len(e.product), e.split, e.first
    # Exclusive prefix counts of the visible events: c[i] = visible events before position i.
    # Both visible sequences are stored back to back in one array, train first, then train+val.
    vis_t, vis_tv = split == SPLIT_CODE["train"], split <= SPLIT_CODE["val"]
    c_t = np.concatenate([[0], np.cumsum(vis_t, dtype=np.int64)])
    c_tv = np.concatenate([[0], np.cumsum(vis_tv, dtype=np.int64)]) + c_t[-1]
    vis_p = np.concatenate([e.product[vis_t], e.product[vis_tv]])
    vis_s = np.concatenate([e.seller[vis_t], e.seller[vis_tv]])

    ex = np.flatnonzero(np.isin(e.event, np.asarray(spec.positive_codes, dtype=e.event.dtype)))
    # grouped by split, then in (user_idx, ts, rid) order: without time the events are in a seeded
    # random order, so the examples are sorted by rid (ts is 0)
    if spec.has_ts:
        ex = ex[np.argsort(split[ex], kind="stable")]
    else:
        ex = ex[np.lexsort((e.rid[ex], e.seg[ex], split[ex]))]
    u = e.seg[ex]
    is_test = split[ex] == SPLIT_CODE["test"]
    lo = np.where(is_test, c_tv[first[u]], c_t[first[u]])  # the user's visible events: [lo, hi)
    hi = np.where(is_test, c_tv[first[u + 1]], c_t[first[u + 1]])
    H = int(spec.max_history)
    if spec.has_ts:
        # the visible events strictly before ts: those before the first event of the example's
        # (user, ts) tie group
        new = np.ones(n, dtype=bool)
        new[1:] = (e.ts[1:] != e.ts[:-1]) | (e.seg[1:] != e.seg[:-1])
        tie = np.maximum.accumulate(np.where(new, np.arange(n), 0))[ex]
        end = np.where(is_test, c_tv[tie], c_t[tie])
        k = np.minimum(end - lo, H)
        offsets, idx = slice_index(end - k, k)
    else:
        # p = visible events up to and including the example; the history takes the events after
        # it, then wraps around to those before it, skipping the example's own row (train only)
        p = np.where(is_test, c_tv[ex + 1], c_t[ex + 1]) - lo
        own = (split[ex] == SPLIT_CODE["train"]).astype(np.int64)
        n_after = np.clip(np.minimum(hi - lo - p, H), 0, None)
        n_before = np.clip(np.minimum(p - own, H - n_after), 0, None)
        offsets, idx = slice_index(lo + p, n_after, lo, n_before)
    ts = e.ts[ex]
    if spec.has_ts and spec.has_clock:
        hour, dow = (ts // 3600) % 24, (ts // 86400 + 3) % 7  # 1970-01-01 was a Thursday
    else:
        hour = dow = np.full(len(ex), -1)
    codes = e.event[ex]
    cols = [
        pa.array(e.users[u].astype(np.int32)),
        pa.array(e.product[ex].astype(np.int32)),
        pa.array(e.seller[ex].astype(np.int32)),
        pa.array(np.asarray(spec.weights, dtype=np.float32)[codes]),
        pa.array(codes.astype(np.int8)),
        pa.array(ts.astype(np.int64)),
        list_array(offsets, vis_p[idx], pa.int32()),
        list_array(offsets, vis_s[idx], pa.int32()),
        pa.array(hour.astype(np.int8)),
        pa.array(dow.astype(np.int8)),
        pa.array(e.rid[ex].astype(np.int64)),
        pc.take(pa.array(SPLITS), pa.array(split[ex].astype(np.int8))),
    ]
    out = pa.RecordBatch.from_arrays(cols, schema=BUILT_SCHEMA)
    ends = np.cumsum(np.bincount(split[ex], minlength=len(SPLITS)))
    starts = np.concatenate([[0], ends[:-1]])
    return [out.slice(int(a), int(b - a)) for a, b in zip(starts, ends, strict=True) if b > a]


def example_batches(spec: ExampleSpec):
    """A ``batches -> batches`` function from :func:`~data_pipelines.user_events.user_events` rows to
    example batches (the ``mapInArrow`` transform of the examples writer)."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for chunk in whole_users(batches):
            yield from examples_from_events(UserEvents.from_table(chunk, spec.has_ts), spec)

    return run
