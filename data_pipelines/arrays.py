"""Arrow list columns to padded numpy matrices (for evaluation and export; the loaders use the same code)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data_pipelines.loaders.base import list_to_padded


def pad_list_column(col: pa.Array | pa.ChunkedArray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned, 0-padded int64 matrix of the LAST ``max_len`` items of each list.

    Args:
        col: a list<int> Arrow column of n rows (nulls are empty lists).
        max_len: width L of the output.

    Returns:
        (values [n, L] int64, lengths [n] int64).
    """
    return list_to_padded(col, max_len, np.int64)
