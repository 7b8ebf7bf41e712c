"""Petastorm loader: ``make_batch_reader`` + ``petastorm.pytorch.BatchedDataLoader``.

- Paths are expanded to the sorted list of part files and passed as ``file://`` URLs, so petastorm's
  row-group order is the same as the arrow loader's.
- Petastorm cannot batch variable-length lists, so a ``TransformSpec`` (run on petastorm's worker)
  turns the two history columns into fixed ``(max_history,)`` arrays (last ``max_history`` items,
  left-aligned, 0-padded, vectorised) and adds ``hist_len``.
- Sharding is petastorm's own: row group ``i`` (global order) belongs to shard ``i % world_size``.
  Shards can differ in size by up to a row group, so every rank stops after the smallest shard's batch
  count (``len()``); surplus rows of larger shards are skipped in that epoch. Needs at least
  ``world_size`` row groups.
- ``shuffle``: petastorm's seeded row-group shuffle (seed derived from ``seed`` and the epoch) plus the
  loader's row shuffling buffer of ``buffer_rows``. That buffer draws from torch's global generator;
  the loader swaps in its own seeded generator state around each step, so the order is reproducible
  and training code's random state is untouched.
- ``num_workers=0`` reads in the calling thread (petastorm's dummy pool): deterministic order.
  ``num_workers>0`` uses a thread pool of that many readers; row groups then arrive in completion
  order, so the batch order (not the per-epoch set of rows) can vary from run to run.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch

from data_pipelines.loaders.base import (
    BATCH_KEYS,
    EXAMPLE_COLUMNS,
    HIST_COLUMNS,
    ExampleLoader,
    mix_seed,
    n_batches,
    pad_histories,
)

# petastorm 0.12 drives pyarrow's legacy dataset API, which warns on every call.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\..*)?$")
warnings.filterwarnings(
    "ignore", message="The given NumPy array is not writable", module=r"petastorm(\..*)?$"
)

DEFAULT_BUFFER_ROWS = 131072


class _PadHistories:
    """Picklable petastorm transform: ragged history lists → fixed ``(max_history,)`` arrays."""

    def __init__(self, max_history: int):
        self.max_history = max_history

    def __call__(self, df):
        n = len(df)
        lens = None
        for c in HIST_COLUMNS:
            col = df[c].to_numpy()
            row_lens = np.fromiter((0 if a is None else len(a) for a in col), np.int64, n)
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum(row_lens, out=offsets[1:])
            parts = [a for a in col if a is not None and len(a)]
            values = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            matrix, kept = pad_histories(offsets, values, self.max_history)
            df[c] = list(matrix)
            if lens is None:
                lens = kept
        df["hist_len"] = lens
        return df


class PetastormExampleLoader(ExampleLoader):
    """See the module docstring."""

    kind = "petastorm"

    def __init__(self, *args, buffer_rows: int = DEFAULT_BUFFER_ROWS, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffer_rows = int(buffer_rows)
        if len(self.row_groups) < self.world_size:
            raise ValueError(
                f"petastorm shards by row group: {len(self.row_groups)} row groups cannot feed "
                f"{self.world_size} ranks; write smaller row groups or use the arrow loader"
            )
        self.shard_rows = [
            sum(rg.num_rows for rg in self.row_groups if rg.index % self.world_size == r)
            for r in range(self.world_size)
        ]

    @property
    def rows_per_rank(self) -> int:
        return self.shard_rows[self.rank]

    def __len__(self) -> int:
        return min(n_batches(r, self.batch_size, self.drop_last) for r in self.shard_rows)

    def _transform_spec(self):
        from petastorm.transform import TransformSpec

        m = self.max_history
        return TransformSpec(
            _PadHistories(m),
            edit_fields=[
                ("hist_products", np.int64, (m,), False),
                ("hist_sellers", np.int64, (m,), False),
                ("hist_len", np.int64, (), False),
            ],
            selected_fields=list(BATCH_KEYS),
        )

    def _reader(self):
        from petastorm import make_batch_reader

        kw = (
            dict(reader_pool_type="dummy")
            if self.num_workers == 0
            else dict(
                reader_pool_type="thread",
                workers_count=self.num_workers,
                results_queue_size=max(2, 2 * self.num_workers),
            )
        )
        shard = dict(cur_shard=self.rank, shard_count=self.world_size) if self.world_size > 1 else {}
        return make_batch_reader(
            ["file://" + f for f in self.files],
            schema_fields=[f"^{c}$" for c in EXAMPLE_COLUMNS],
            shuffle_row_groups=self.shuffle,
            seed=mix_seed(self.seed, self.epoch, 0x9E7),
            num_epochs=1,
            transform_spec=self._transform_spec(),
            **shard,
            **kw,
        )

    @staticmethod
    def _finalize(batch: dict) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(torch.float32 if k == "weight" else torch.int64) for k in BATCH_KEYS}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from petastorm.pytorch import BatchedDataLoader

        n = len(self)
        if n == 0:
            return
        reader = self._reader()
        it = None
        try:
            loader = BatchedDataLoader(
                reader,
                batch_size=self.batch_size,
                shuffling_queue_capacity=self.buffer_rows if self.shuffle else 0,
            )
            it = iter(loader)
            rng_state = None
            if self.shuffle:
                g = torch.Generator()
                g.manual_seed(mix_seed(self.seed, self.epoch, self.rank, 0x5B))
                rng_state = g.get_state()
            for _ in range(n):
                if rng_state is None:
                    batch = next(it)
                else:
                    saved = torch.get_rng_state()
                    torch.set_rng_state(rng_state)
                    try:
                        batch = next(it)
                    finally:
                        rng_state = torch.get_rng_state()
                        torch.set_rng_state(saved)
                if self.drop_last and len(batch["user_idx"]) < self.batch_size:
                    return
                yield self._finalize(batch)
        finally:
            if it is not None:
                it.close()
            reader.stop()
            reader.join()
