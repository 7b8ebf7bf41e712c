"""Per-user histories (``histories/{train,full}.parquet``): the user's events in event order, the last N.

``train`` holds the train-split events, the last ``4 × max_history`` (what the model may see
when predicting val and test); ``full`` holds every event, uncut (serving excludes everything a
user ever bought). Built in numpy from each user's events (:mod:`data_pipelines.user_events`)
inside the task that writes them; users without a visible event get no row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from data_pipelines.user_events import UserEvents, list_array, whole_users

HISTORY_ARROW_SCHEMA = pa.schema(
    [
        ("user_idx", pa.int32()),
        ("products", pa.list_(pa.int32())),
        ("sellers", pa.list_(pa.int32())),
        ("types", pa.list_(pa.int8())),
    ]
)
FULL_HISTORY_CAP = 1 << 30


@dataclass(frozen=True)
class HistorySpec:
    """One history table: its name, the splits it sees (split code <= ``max_code``; None: all), its length cap."""

    name: str
    max_code: int | None
    max_len: int


def history_from_events(e: UserEvents, spec: HistorySpec) -> pa.RecordBatch:
    """The history rows (:data:`HISTORY_ARROW_SCHEMA`) of a chunk of whole users, users ascending.

    Args:
        e: the users' events, in event order.
        spec: which events and how many.
    """
    vis = np.arange(len(e.product)) if spec.max_code is None else np.flatnonzero(e.split <= spec.max_code)
    seg = e.seg[vis]
    counts = np.bincount(seg, minlength=len(e.users))
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])  # each user's first visible event in vis
    rank = np.arange(len(vis)) - start[seg]  # position within the user's visible events
    keep = vis[rank >= counts[seg] - int(spec.max_len)]
    kept = np.minimum(counts, int(spec.max_len))
    has = kept > 0
    offsets = np.zeros(int(has.sum()) + 1, dtype=np.int32)
    np.cumsum(kept[has], out=offsets[1:])
    return pa.RecordBatch.from_arrays(
        [
            pa.array(e.users[has].astype(np.int32)),
            list_array(offsets, e.product[keep], pa.int32()),
            list_array(offsets, e.seller[keep], pa.int32()),
            list_array(offsets, e.event[keep], pa.int8()),
        ],
        schema=HISTORY_ARROW_SCHEMA,
    )


def history_batches(specs: tuple[HistorySpec, ...], has_ts: bool):
    """A ``batches -> batches`` function from :func:`~data_pipelines.user_events.user_events` rows to
    history rows of every spec, with a ``history`` column naming the spec (the ``mapInArrow``
    transform of the histories writer)."""

    schema = HISTORY_ARROW_SCHEMA.append(pa.field("history", pa.string()))

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for chunk in whole_users(batches):
            e = UserEvents.from_table(chunk, has_ts)
            for spec in specs:
                b = history_from_events(e, spec)
                if b.num_rows:
                    name = pa.array([spec.name] * b.num_rows, pa.string())
                    yield pa.RecordBatch.from_arrays([*b.columns, name], schema=schema)

    return run
