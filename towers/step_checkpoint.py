"""A checkpoint every N optimizer steps, when a Lightning step may take several."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl


class StepCheckpoint(pl.Callback):
    """Overwrites ``path`` each time the optimizer step count passes a multiple of ``every``.

    Not ``ModelCheckpoint(every_n_train_steps=...)``: that saves when ``global_step % every == 0``
    after a Lightning step, and a Lightning step of ``train.batches_per_call`` batches advances the
    count by several steps at once, jumping over most multiples.
    """

    def __init__(self, path: Path, every: int):
        self.path = Path(path)
        self.every = int(every)
        self._passed = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._passed = trainer.global_step // self.every  # a resumed run counts from where it was

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        passed = trainer.global_step // self.every
        if passed > self._passed:
            self._passed = passed
            trainer.save_checkpoint(self.path)  # on every rank: the strategy writes on rank 0 only
