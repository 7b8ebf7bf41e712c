"""LightningDataModule over the prepared artifact: training batches and full-ranking val queries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from data_pipelines.loaders import make_loader
from data_pipelines.schema import EVENT_CODE
from towers.batch_groups import BatchGroups
from towers.eval_data import EvalQueries, build_queries


def event_codes(names: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(EVENT_CODE[n] for n in names if n in EVENT_CODE)


class TowerDataModule(pl.LightningDataModule):
    """Training examples through the configured loader; validation queries from the val split.

    Args:
        prepared: prepared artifact directory.
        batch_size, max_history, loader, num_workers, seed: loader settings.
        batches_per_call: the training loader yields lists of this many batches (:class:`towers.batch_groups.BatchGroups`).
        target_events, bought_events: event-type names for val targets and exclusions.
        val_max_users: cap on validation users (a seeded sample) to bound validation time.
    """

    def __init__(
        self,
        prepared: str | Path,
        batch_size: int,
        max_history: int,
        loader: str = "arrow",
        num_workers: int = 0,
        seed: int = 0,
        target_events: tuple[str, ...] = ("purchase",),
        bought_events: tuple[str, ...] = ("purchase",),
        val_max_users: int = 20000,
        val_batch_users: int = 1024,
        train_splits: tuple[str, ...] = ("train",),
        validate: bool = True,
        batches_per_call: int = 1,
    ):
        super().__init__()
        if int(batches_per_call) < 1:
            raise ValueError(f"train.batches_per_call must be >= 1, got {batches_per_call}")
        self.batches_per_call = int(batches_per_call)
        self.prepared = Path(prepared)
        self.batch_size = batch_size
        self.max_history = max_history
        self.loader_kind = loader
        self.num_workers = num_workers
        self.seed = seed
        self.target_events = target_events
        self.bought_events = bought_events
        self.val_max_users = val_max_users
        self.val_batch_users = val_batch_users
        self.val_queries: EvalQueries | None = None
        self.train_splits = train_splits
        self.validate = validate

    def setup(self, stage: str | None = None) -> None:
        if self.validate and self.val_queries is None and (self.prepared / "examples" / "val").exists():
            q = build_queries(
                self.prepared,
                "val",
                self.max_history,
                target_events=event_codes(self.target_events) or None,
                exclude_events=event_codes(self.bought_events),
                exclude_splits=("train",),
            )
            if len(q) == 0:
                # No target-type events in validation (e.g. a view-only log): use every positive.
                q = build_queries(self.prepared, "val", self.max_history, None, event_codes(self.bought_events))
            if len(q) > self.val_max_users:
                rows = np.sort(np.random.default_rng(self.seed).choice(len(q), self.val_max_users, replace=False))
                q = q.subset(rows)
            self.val_queries = q

    def train_dataloader(self):
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        epoch = trainer.current_epoch if trainer is not None else 0
        loader = make_loader(
            self.loader_kind,
            [str(self.prepared / "examples" / s) for s in self.train_splits if (self.prepared / "examples" / s).exists()],
            batch_size=self.batch_size,
            max_history=self.max_history,
            shuffle=True,
            seed=self.seed,
            num_workers=self.num_workers,
            rank=rank,
            world_size=world,
            drop_last=False,
            epoch=epoch,
        )
        return BatchGroups(loader, self.batches_per_call) if self.batches_per_call > 1 else loader

    def val_dataloader(self):
        """Validation query rows; with several ranks, rank r takes rows r, r + W, ... padded with -1
        to the same length on every rank (so all ranks run the same number of validation steps, and
        no user is counted twice)."""
        n = len(self.val_queries) if self.val_queries is not None else 0
        rows = torch.arange(n)
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        if world > 1:
            mine = rows[trainer.global_rank :: world]
            rows = torch.cat([mine, torch.full((-(-n // world) - len(mine),), -1, dtype=rows.dtype)])
        return DataLoader(rows, batch_size=self.val_batch_users, shuffle=False)
