"""Each user's events in event order, streamed from Spark to numpy one chunk of whole users at a time.

The examples and the per-user histories are built in numpy inside the tasks that write them
(:mod:`data_pipelines.examples`, :mod:`data_pipelines.histories`), from the flat event rows of
:func:`user_events`: Spark hands each task its partition as Arrow batches (primitive columns,
about 30 bytes per event), :func:`whole_users` regroups them so that no user straddles a chunk,
and :class:`UserEvents` exposes a chunk as numpy arrays in each user's event order. Collecting
per-user arrays in Spark (collect_list + array_sort) instead cost about 9 s of the 10M-event job,
and Spark's window, join and slicing for the examples about twice the numpy time.

Event order: with timestamps (ts, rid); without, a seeded random order (``uniform(seed, rid)``,
then rid), the same for every consumer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from data_pipelines.schema import SPLITS
from data_pipelines.splits import uniform

SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}  # train 0, val 1, test 2: train+val = code <= 1

# Rows per chunk handed to numpy: large enough that per-chunk overhead vanishes, small enough
# that a chunk's examples (about 40 history values per event) stay well under 100 MB.
CHUNK_ROWS = 200_000


def user_events(ev: DataFrame, has_ts: bool, seed: int) -> DataFrame:
    """The events with a known user and product, as the flat columns :class:`UserEvents` reads.

    Args:
        ev: indexed events with ``split``, all of a user's rows in one partition, sorted within
            partitions by (user_idx, ts, rid) (``prepare`` caches them so): the rows of a user are
            contiguous and users ascend, which :func:`whole_users` checks within a partition.
        has_ts: whether the events have timestamps (without, ``k`` carries the seeded order).
        seed: the seed of the order without timestamps.

    Returns:
        user_idx int, product_idx int, seller_idx int, event byte, split byte (:data:`SPLIT_CODE`),
        ts long, rid long [, k double], in the input order.
    """
    v = F.lit(None).cast("byte")
    for name, code in SPLIT_CODE.items():
        v = F.when(F.col("split") == name, F.lit(code).cast("byte")).otherwise(v)
    cols = [
        F.col("user_idx").cast("int"),
        F.col("product_idx").cast("int"),
        F.col("seller_idx").cast("int"),
        F.col("event").cast("byte"),
        v.alias("split"),
        F.col("ts").cast("long"),
        F.col("rid").cast("long"),
    ]
    if not has_ts:
        cols.append(uniform(seed, F.col("rid")).alias("k"))
    return ev.where((F.col("product_idx") > 0) & (F.col("user_idx") > 0)).select(*cols)


def whole_users(batches: Iterator[pa.RecordBatch], min_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """Regroup a partition's batches into tables of at least ``min_rows`` rows (but the last) that never split a user.

    Raises:
        RuntimeError: the users do not ascend (the rows of a user are not contiguous).
    """
    pending: list[pa.RecordBatch] = []
    n = 0
    last_user = None
    for b in batches:
        if b.num_rows == 0:
            continue
        users = b.column("user_idx").to_numpy(zero_copy_only=False)
        if np.any(users[1:] < users[:-1]) or (last_user is not None and users[0] < last_user):
            raise RuntimeError("user events are not grouped by ascending user_idx; the example builder relies on it")
        last_user = users[-1]
        pending.append(b)
        n += b.num_rows
        if n < min_rows:
            continue
        t = pa.Table.from_batches(pending).combine_chunks()
        all_users = t.column("user_idx").to_numpy()
        cut = int(np.searchsorted(all_users, all_users[-1], side="left"))  # the last user's first row
        if cut == 0:  # one user so far: keep reading
            continue
        yield t.slice(0, cut)
        pending = t.slice(cut).to_batches()
        n = t.num_rows - cut
    if n:
        yield pa.Table.from_batches(pending).combine_chunks()


@dataclass
class UserEvents:
    """A chunk of whole users' events as numpy arrays, each user's events contiguous and in event order.

    Attributes:
        users: (U,) the chunk's user indexes, ascending.
        first: (U+1,) each user's first event; ``first[-1]`` = number of events.
        seg: (N,) the position in ``users`` of each event's user.
        product, seller, event, split, ts, rid: (N,) per event.
    """

    users: np.ndarray
    first: np.ndarray
    seg: np.ndarray
    product: np.ndarray
    seller: np.ndarray
    event: np.ndarray
    split: np.ndarray
    ts: np.ndarray
    rid: np.ndarray

    @classmethod
    def from_table(cls, t: pa.Table, has_ts: bool) -> UserEvents:
        """Arrays of a :func:`whole_users` chunk, put in event order (time order arrives sorted; without
        time the rows are sorted by the seeded key ``k``)."""
        cols = {c: t.column(c).to_numpy() for c in t.column_names}
        user = cols["user_idx"]
        if not has_ts:
            order = np.lexsort((cols["rid"], cols["k"], user))
            cols = {c: a[order] for c, a in cols.items()}
            user = cols["user_idx"]
        n = len(user)
        starts = np.flatnonzero(np.concatenate([[True], user[1:] != user[:-1]])) if n else np.zeros(0, np.int64)
        first = np.append(starts, n).astype(np.int64)
        seg = np.repeat(np.arange(len(starts)), np.diff(first))
        return cls(
            users=user[starts],
            first=first,
            seg=seg,
            product=cols["product_idx"],
            seller=cols["seller_idx"],
            event=cols["event"],
            split=cols["split"],
            ts=cols["ts"],
            rid=cols["rid"],
        )


def list_array(offsets: np.ndarray, values: np.ndarray, dtype: pa.DataType) -> pa.ListArray:
    """A ListArray from int32 offsets and values cast to ``dtype``."""
    values = values.astype(dtype.to_pandas_dtype(), copy=False)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, dtype))
