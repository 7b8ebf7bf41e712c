"""Learning-rate schedule on a validation plateau: restore the best weights, decay, stop when spent.

On Gowalla the published SimpleX run gained most of its last Recall@20 points (0.177 → 0.187)
after its first plateau, by reloading the best model and dividing the learning rate by 10; plain
early stopping leaves those points on the table. The schedule is recorded in "effective epochs"
(epochs whose updates survive in the selected weights) so a refit on all data can replay it
without validation (:class:`ReplayDecay`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


def scale_learning_rates(trainer: pl.Trainer, factor: float) -> None:
    """Multiply the learning rate of every optimizer's parameter groups by ``factor``."""
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["lr"] * factor


class PlateauDecay(pl.Callback):
    """Decay the learning rate when the monitored metric stops improving; stop when decays are spent.

    After ``decay_patience`` validations without improvement the module's weights go back to the
    best checkpoint and every learning rate is multiplied by ``factor``, at most ``max_decays``
    times; after that, ``stop_patience`` more validations without improvement stop training. This
    replaces plain early stopping (``max_decays=0`` is early stopping with ``stop_patience``).

    Args:
        monitor: metric name in ``trainer.callback_metrics`` (higher is better).
        best_ckpt: path of the best checkpoint that ModelCheckpoint keeps (weights are restored from it).
        factor: learning-rate multiplier per decay, in (0, 1).
        decay_patience: validations without improvement before a decay.
        max_decays: how many decays before stopping is allowed.
        stop_patience: validations without improvement, after the last decay, before stopping (0 = never).
    """

    def __init__(self, monitor: str, best_ckpt: str | Path, factor: float = 0.1, decay_patience: int = 1,
                 max_decays: int = 2, stop_patience: int = 3):
        if not 0.0 < factor < 1.0:
            raise ValueError(f"train.lr_decay_factor must be in (0, 1), got {factor}")
        self.monitor = monitor
        self.best_ckpt = Path(best_ckpt)
        self.factor = factor
        self.decay_patience = max(1, decay_patience)
        self.max_decays = max(0, max_decays)
        self.stop_patience = stop_patience
        self.best: float | None = None
        self.bad = 0
        self.effective = 0  # epochs whose updates are in the current weights
        self.best_effective = 0
        self.decay_points: list[int] = []  # effective epoch counts at which the lr was decayed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Counted at the start: Lightning validates at the end of an epoch before on_train_epoch_end,
        # and the validation must see this epoch counted.
        self.effective += 1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if self.best is None or value > self.best:
            self.best, self.bad, self.best_effective = value, 0, self.effective
            return
        self.bad += 1
        if len(self.decay_points) < self.max_decays:
            if self.bad >= self.decay_patience and self.best_ckpt.exists():
                state = torch.load(self.best_ckpt, map_location="cpu", weights_only=False)["state_dict"]
                pl_module.load_state_dict(state)
                scale_learning_rates(trainer, self.factor)
                self.effective = self.best_effective
                self.decay_points.append(self.effective)
                self.bad = 0
        elif self.stop_patience > 0 and self.bad >= self.stop_patience:
            trainer.should_stop = True

    def schedule(self) -> dict[str, Any]:
        """What a refit replays: ``epochs`` (effective epochs of the best weights) and ``decay_at``."""
        return {"epochs": self.best_effective, "decay_at": list(self.decay_points), "factor": self.factor}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad, "effective": self.effective,
                "best_effective": self.best_effective, "decay_points": list(self.decay_points)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.bad = int(state.get("bad", 0))
        self.effective = int(state.get("effective", 0))
        self.best_effective = int(state.get("best_effective", 0))
        self.decay_points = [int(x) for x in state.get("decay_points", [])]


class ReplayDecay(pl.Callback):
    """Replay a recorded schedule without validation: decay the lr before each epoch in ``decay_at``.

    Args:
        decay_at: effective epoch counts (0-based epoch index at which the decayed lr starts).
        factor: learning-rate multiplier per decay.
    """

    def __init__(self, decay_at: list[int], factor: float):
        self.decay_at = [int(x) for x in decay_at]
        self.factor = factor

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for _ in range(self.decay_at.count(trainer.current_epoch)):
            scale_learning_rates(trainer, self.factor)


__all__ = ["PlateauDecay", "ReplayDecay", "scale_learning_rates"]
