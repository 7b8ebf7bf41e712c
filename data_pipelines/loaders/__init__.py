"""Prepared examples (Parquet) → batches of torch tensors, behind one interface.

>>> loader = make_loader("arrow", "prepared/examples/train", batch_size=1024, max_history=50)
>>> for epoch in range(epochs):
...     loader.set_epoch(epoch)
...     for batch in loader: ...   # dict[str, torch.Tensor], see data_pipelines.loaders.base

``kind``: ``arrow`` (native pyarrow, the default and the fast one) or ``petastorm``. Both yield the same
batches in the same order for ``shuffle=False``, ``num_workers=0`` and one rank; they shard differently
across ranks (arrow: equal row ranges; petastorm: whole row groups), see their module docstrings.
"""

from __future__ import annotations

from collections.abc import Sequence

from data_pipelines.loaders.base import BATCH_KEYS, ExampleLoader, list_parquet_files, pad_histories

LOADER_KINDS = ("arrow", "petastorm")


def make_loader(
    kind: str,
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
    **options,
) -> ExampleLoader:
    """Build a loader over examples Parquet files or directories.

    Args:
        kind: ``arrow`` or ``petastorm``.
        paths: part files and/or directories (searched recursively for ``*.parquet``).
        batch_size: rows per batch (the last batch of an epoch may be smaller unless ``drop_last``).
        max_history: width of ``hist_products``/``hist_sellers``; longer histories keep their last items.
        shuffle: seeded row-group permutation plus an in-memory row shuffle buffer, per epoch.
        seed, epoch: the shuffle of epoch ``epoch`` is a function of both (``set_epoch`` changes it).
        num_workers: parallel readers (arrow: DataLoader worker processes; petastorm: reader threads).
        rank, world_size: data-parallel shard; every rank yields ``len(loader)`` batches.
        drop_last: drop the last incomplete batch.
        **options: loader-specific, e.g. ``buffer_rows`` (shuffle buffer size, both kinds),
            ``prefetch_factor`` and ``pin_memory`` (arrow).
    """
    kw = dict(
        shuffle=shuffle,
        seed=seed,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        epoch=epoch,
        **options,
    )
    if kind == "arrow":
        from data_pipelines.loaders.arrow_loader import ArrowExampleLoader

        return ArrowExampleLoader(paths, batch_size, max_history, **kw)
    if kind == "petastorm":
        from data_pipelines.loaders.petastorm_loader import PetastormExampleLoader

        return PetastormExampleLoader(paths, batch_size, max_history, **kw)
    raise ValueError(f"unknown loader kind {kind!r}; expected one of {LOADER_KINDS}")


__all__ = [
    "BATCH_KEYS",
    "LOADER_KINDS",
    "ExampleLoader",
    "list_parquet_files",
    "make_loader",
    "pad_histories",
]
