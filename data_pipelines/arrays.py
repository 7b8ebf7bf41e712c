"""Arrow list columns to padded numpy matrices (shared by the loaders and evaluation)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def pad_list_column(col: pa.Array | pa.ChunkedArray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned, 0-padded matrix of the LAST ``max_len`` items of each list.

    Args:
        col: a list<int> Arrow column of n rows (nulls are empty lists).
        max_len: width L of the output.

    Returns:
        (values [n, L] int64, lengths [n] int64).
    """
    if isinstance(col, pa.ChunkedArray):
        col = pa.concat_arrays(col.chunks) if col.num_chunks != 1 else col.chunk(0)
    n = len(col)
    out = np.zeros((n, max_len), dtype=np.int64)
    if n == 0 or max_len == 0:
        return out, np.zeros(n, dtype=np.int64)
    offsets = np.asarray(col.offsets, dtype=np.int64)
    values = np.asarray(col.flatten(), dtype=np.int64) if len(col.flatten()) else np.zeros(0, np.int64)
    # col.flatten() already accounts for the array offset; rebase offsets to it.
    offsets = offsets - offsets[0]
    if col.null_count:
        valid = np.asarray(col.is_valid(), dtype=bool)
        lengths_raw = np.where(valid, np.diff(offsets), 0)
    else:
        lengths_raw = np.diff(offsets)
    lengths = np.minimum(lengths_raw, max_len)
    starts = offsets[:-1] + lengths_raw - lengths  # keep the most recent items
    total = int(lengths.sum())
    if total:
        row = np.repeat(np.arange(n), lengths)
        pos = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[row, pos] = values[np.repeat(starts, lengths) + pos]
    return out, lengths
