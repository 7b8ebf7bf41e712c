"""The common interface of the prepared-examples loaders and the vectorised helpers they share.

A loader turns ``examples/<split>/*.parquet`` (columns :data:`data_pipelines.schema.EXAMPLE_COLUMNS`)
into batches, each a ``dict[str, torch.Tensor]``:

==============================  ==========  ==============================================
key                             dtype       shape / meaning
==============================  ==========  ==============================================
user_idx, product_idx,          int64       [B]
seller_idx, event, ts,
hour, dow
weight                          float32     [B]
hist_products, hist_sellers     int64       [B, max_history]; LEFT-aligned: the row's last
                                            ``max_history`` items (oldest first), then 0s
hist_len                        int64       [B]; number of non-padding history entries
==============================  ==========  ==============================================

Index 0 is the padding / unknown index everywhere.
"""

from __future__ import annotations

import abc
import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipelines.schema import EXAMPLE_COLUMNS

SCALAR_INT_COLUMNS = ("user_idx", "product_idx", "seller_idx", "event", "ts", "hour", "dow")
HIST_COLUMNS = ("hist_products", "hist_sellers")
BATCH_KEYS = (*SCALAR_INT_COLUMNS, "weight", *HIST_COLUMNS, "hist_len")


def list_parquet_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand files and directories (searched recursively) into a sorted list of absolute ``.parquet`` paths.

    Hidden and underscore-prefixed files (``_SUCCESS``, ``.crc``) are ignored. The order (sorted absolute
    path) defines the row-group order every loader uses.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = os.path.abspath(os.fspath(p).removeprefix("file://"))
        if os.path.isdir(p):
            found = [
                f
                for f in glob.glob(os.path.join(p, "**", "*.parquet"), recursive=True)
                if not os.path.basename(f).startswith(("_", "."))
            ]
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"no examples Parquet at {p}")
    out = sorted(set(out))
    if not out:
        raise FileNotFoundError(f"no .parquet files under {list(map(os.fspath, paths))}")
    return out


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group: the unit of reading. ``index`` is its position in the global order."""

    index: int
    path: str
    row_group: int
    num_rows: int


def row_groups(files: Sequence[str]) -> list[RowGroup]:
    """All row groups of ``files`` in (file, row group) order, from the footers only."""
    out: list[RowGroup] = []
    for f in files:
        md = pq.ParquetFile(f).metadata
        names = md.schema.to_arrow_schema().names
        missing = [c for c in EXAMPLE_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{f} lacks example columns {missing}; expected {list(EXAMPLE_COLUMNS)}")
        for i in range(md.num_row_groups):
            out.append(RowGroup(len(out), f, i, md.row_group(i).num_rows))
    return out


def mix_seed(*parts: int) -> int:
    """A 32-bit seed derived from several integers (seed, epoch, rank, ...), stable across processes."""
    ss = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def pad_histories(
    offsets: np.ndarray, values: np.ndarray, max_history: int, dtype=np.int64
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised ragged → padded conversion.

    Row ``i`` holds ``values[offsets[i]:offsets[i+1]]``; its last ``max_history`` entries are written
    left-aligned into a ``[n, max_history]`` matrix of ``dtype`` padded with 0.

    Returns:
        (matrix, lengths) where ``lengths`` is the number of kept entries per row (int64).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    ends = offsets[1:]
    lens = ends - offsets[:-1]
    kept = np.minimum(lens, max_history)
    out = np.zeros((n, max_history), dtype=dtype)
    if n == 0 or max_history == 0 or len(values) == 0:
        return out, kept
    starts = ends - kept
    cols = np.arange(max_history, dtype=np.int64)
    mask = cols[None, :] < kept[:, None]
    idx = (starts[:, None] + cols[None, :])[mask]
    out[mask] = values[idx]
    return out, kept


def list_to_padded(
    arr: pa.Array | pa.ChunkedArray, max_history: int, dtype
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if arr.null_count:
        arr = pc.fill_null(arr, pa.scalar([], type=arr.type))
    values = arr.values  # the whole child array; ``offsets`` index into it (slices included)
    if values.null_count:
        values = pc.fill_null(values, 0)
    return pad_histories(arr.offsets.to_numpy(), values.to_numpy(zero_copy_only=False), max_history, dtype)


def _scalar(arr: pa.ChunkedArray | pa.Array, dtype) -> np.ndarray:
    if arr.null_count:
        arr = pc.fill_null(arr, 0)
    if isinstance(arr, pa.ChunkedArray):
        return np.asarray(arr.to_numpy(), dtype=dtype)
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=dtype)


def table_to_numpy(table: pa.Table, max_history: int, compact: bool = False) -> dict[str, np.ndarray]:
    """Convert an examples table (any number of chunks) into the batch layout as numpy arrays.

    ``compact=True`` keeps int32 histories and the columns' own integer types (half the memory, for
    buffers); :func:`to_torch_batch` casts to the final dtypes.
    """
    out: dict[str, np.ndarray] = {}
    for c in SCALAR_INT_COLUMNS:
        col = table.column(c)
        out[c] = _scalar(col, col.type.to_pandas_dtype() if compact else np.int64)
    out["weight"] = _scalar(table.column("weight"), np.float32)
    lens = None
    for c in HIST_COLUMNS:
        out[c], n = list_to_padded(table.column(c), max_history, np.int32 if compact else np.int64)
        if lens is None:
            lens = n
    out["hist_len"] = lens
    return out


def to_torch_batch(arrays: dict[str, np.ndarray], index: np.ndarray | slice | None = None) -> dict:
    """Select rows (``index``) of a numpy batch layout and convert to tensors with the final dtypes."""
    import torch

    out = {}
    for k in BATCH_KEYS:
        a = arrays[k] if index is None else arrays[k][index]
        a = a.astype(np.float32 if k == "weight" else np.int64, copy=False)
        out[k] = torch.from_numpy(np.ascontiguousarray(a))
    return out


def concat_numpy(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def n_batches(rows: int, batch_size: int, drop_last: bool) -> int:
    return rows // batch_size if drop_last else -(-rows // batch_size)


class ExampleLoader(abc.ABC):
    """An iterable of batches (see the module docstring) over this rank's share of the examples.

    ``set_epoch(e)`` selects the deterministic shuffle of epoch ``e`` (call it before each epoch, as with
    ``DistributedSampler``); ``len()`` is the number of batches this rank yields per epoch, and every
    rank yields the same number.
    """

    kind: str = ""

    def __init__(
        self,
        paths: str | Sequence[str],
        batch_size: int,
        max_history: int,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        epoch: int = 0,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if max_history < 0:
            raise ValueError(f"max_history must be >= 0, got {max_history}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.files = list_parquet_files(paths)
        self.row_groups = row_groups(self.files)
        self.total_rows = sum(rg.num_rows for rg in self.row_groups)
        self.batch_size = int(batch_size)
        self.max_history = int(max_history)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __iter__(self) -> Iterator[dict]: ...

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(files={len(self.files)}, row_groups={len(self.row_groups)}, "
            f"rows={self.total_rows}, batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, "
            f"batches={len(self)})"
        )
