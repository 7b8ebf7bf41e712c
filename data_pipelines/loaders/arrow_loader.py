"""Native pyarrow loader: Parquet row groups → numpy (vectorised) → torch, no per-row Python.

How an epoch is laid out (everything is a function of the footers, ``seed``, ``epoch`` and the rank,
so it is deterministic and needs no coordination between ranks or workers):

1. Row groups in (sorted file path, row group) order; with ``shuffle`` they are permuted by a
   generator seeded with ``(seed, epoch)`` — the same permutation on every rank.
2. Sharding is by rows, not row groups: rank ``r`` of ``W`` takes rows ``[r*N//W, (r+1)*N//W)`` of
   that (permuted) concatenation, with ``N//W`` rows each, so all ranks get the same number of batches
   however few or uneven the row groups are (the last ``N % W`` rows of an epoch are skipped when
   ``W > 1``; with shuffling they differ from epoch to epoch). A rank reads only the row groups its
   range touches.
3. A rank's rows are cut into chunks of ``buffer_rows`` (rounded up to a multiple of ``batch_size``).
   A chunk is the in-memory shuffle buffer: read, converted, permuted with a generator seeded by
   ``(seed, epoch, rank, chunk)`` and sliced into batches. Batches never straddle chunks, so the set
   of batches does not depend on ``num_workers``.
4. ``num_workers > 0``: a ``torch.utils.data.DataLoader`` over an ``IterableDataset``; worker ``w``
   owns chunks ``w, w + num_workers, ...`` (disjoint). The DataLoader interleaves the workers'
   batches round robin, so the batch *order* (not the batches) differs from ``num_workers=0``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipelines.loaders.base import (
    EXAMPLE_COLUMNS,
    ExampleLoader,
    RowGroup,
    concat_numpy,
    mix_seed,
    n_batches,
    table_to_numpy,
    to_torch_batch,
)

DEFAULT_BUFFER_ROWS = 131072


@dataclass(frozen=True)
class _Chunk:
    index: int
    segments: tuple[tuple[int, int, int], ...]  # (row group index, start row, end row)
    num_rows: int
    num_batches: int


def _identity(x):
    return x


class _ChunkDataset(IterableDataset):
    """Yields the batches (compact numpy dicts) of its chunks; in a DataLoader worker only its chunks.

    Workers ship numpy arrays (int32 histories: half the bytes) through the result queue and the main
    process makes the tensors: much cheaper than torch's one-shared-memory-segment-per-tensor transfer.
    """

    def __init__(
        self,
        row_groups: list[RowGroup],
        chunks: list[_Chunk],
        batch_size: int,
        max_history: int,
        shuffle: bool,
        seeds: tuple[int, ...],
    ):
        super().__init__()
        self.row_groups = row_groups
        self.chunks = chunks
        self.batch_size = batch_size
        self.max_history = max_history
        self.shuffle = shuffle
        self.seeds = seeds

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        files: dict[str, pq.ParquetFile] = {}
        cache: dict[int, dict[str, np.ndarray]] = {}  # the last converted row group
        try:
            for chunk in self.chunks[wid::nw]:
                parts = []
                for rg_i, start, end in chunk.segments:
                    if rg_i not in cache:
                        rg = self.row_groups[rg_i]
                        f = files.get(rg.path)
                        if f is None:
                            f = files[rg.path] = pq.ParquetFile(rg.path, memory_map=False)
                        table = f.read_row_group(rg.row_group, columns=list(EXAMPLE_COLUMNS))
                        cache.clear()
                        cache[rg_i] = table_to_numpy(table, self.max_history, compact=True)
                    arrays = cache[rg_i]
                    parts.append({k: v[start:end] for k, v in arrays.items()})
                data = concat_numpy(parts)
                b = self.batch_size
                if self.shuffle:
                    perm = np.random.default_rng(mix_seed(*self.seeds, chunk.index)).permutation(
                        chunk.num_rows
                    )
                    for j in range(chunk.num_batches):
                        idx = perm[j * b : (j + 1) * b]
                        yield {k: v[idx] for k, v in data.items()}
                else:
                    for j in range(chunk.num_batches):
                        yield {k: v[j * b : (j + 1) * b] for k, v in data.items()}
        finally:
            for f in files.values():
                f.close()


class ArrowExampleLoader(ExampleLoader):
    """See the module docstring. ``buffer_rows`` sets the shuffle-buffer (chunk) size."""

    kind = "arrow"

    def __init__(
        self,
        *args,
        buffer_rows: int = DEFAULT_BUFFER_ROWS,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.chunk_rows = (
            max(1, math.ceil(max(buffer_rows, self.batch_size) / self.batch_size)) * self.batch_size
        )
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory

    # -- the plan ------------------------------------------------------------------------------
    @property
    def rows_per_rank(self) -> int:
        return self.total_rows // self.world_size

    def __len__(self) -> int:
        return n_batches(self.rows_per_rank, self.batch_size, self.drop_last)

    def _row_group_order(self) -> np.ndarray:
        n = len(self.row_groups)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng(mix_seed(self.seed, self.epoch, 0xA77)).permutation(n)

    def plan(self) -> list[_Chunk]:
        """The chunks (with their row-group segments) this rank reads in the current epoch."""
        order = self._row_group_order()
        sizes = np.array([self.row_groups[i].num_rows for i in order], dtype=np.int64)
        bounds = np.concatenate([[0], np.cumsum(sizes)])  # global row offsets of the ordered row groups
        nb = len(self)
        used = min(nb * self.batch_size, self.rows_per_rank)
        lo = self.rank * self.rows_per_rank
        chunks = []
        for k, c_lo in enumerate(range(lo, lo + used, self.chunk_rows)):
            c_hi = min(c_lo + self.chunk_rows, lo + used)
            first = int(np.searchsorted(bounds, c_lo, side="right")) - 1
            segs = []
            pos = first
            while pos < len(order) and bounds[pos] < c_hi:
                s = max(c_lo, bounds[pos]) - bounds[pos]
                e = min(c_hi, bounds[pos + 1]) - bounds[pos]
                if e > s:
                    segs.append((int(order[pos]), int(s), int(e)))
                pos += 1
            rows = c_hi - c_lo
            chunks.append(_Chunk(k, tuple(segs), rows, math.ceil(rows / self.batch_size)))
        return chunks

    def dataset(self) -> _ChunkDataset:
        return _ChunkDataset(
            self.row_groups,
            self.plan(),
            self.batch_size,
            self.max_history,
            self.shuffle,
            (self.seed, self.epoch, self.rank),
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ds = self.dataset()
        if self.num_workers == 0:
            batches = iter(ds)
        else:
            batches = DataLoader(
                ds,
                batch_size=None,
                collate_fn=_identity,
                num_workers=min(self.num_workers, max(1, len(ds.chunks))),
                prefetch_factor=self.prefetch_factor,
                persistent_workers=False,
            )
        for arrays in batches:
            batch = to_torch_batch(arrays)
            if self.pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            yield batch
