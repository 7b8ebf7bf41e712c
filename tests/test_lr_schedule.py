"""The plateau schedule: restore best weights + decay, stop when spent, and its replay in a refit."""

from types import SimpleNamespace

import torch
from torch import nn

from towers.lr_schedule import PlateauDecay, ReplayDecay


def _trainer(opt):
    return SimpleNamespace(optimizers=[opt], callback_metrics={}, sanity_checking=False, should_stop=False, current_epoch=0)


def _epoch(cb, trainer, module, value):
    cb.on_train_epoch_start(trainer, module)
    trainer.callback_metrics["val/recall@20"] = torch.tensor(value)
    cb.on_validation_end(trainer, module)


def test_plateau_restores_best_weights_decays_and_stops(tmp_path) -> None:
    module = nn.Linear(2, 1)
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    trainer = _trainer(opt)
    cb = PlateauDecay("val/recall@20", tmp_path / "best.ckpt", factor=0.1, decay_patience=1, max_decays=2, stop_patience=2)

    _epoch(cb, trainer, module, 0.10)
    _epoch(cb, trainer, module, 0.20)  # best after 2 effective epochs
    best = {k: v.clone() for k, v in module.state_dict().items()}
    torch.save({"state_dict": best}, tmp_path / "best.ckpt")
    with torch.no_grad():
        module.weight.add_(5.0)  # the next epoch drifts and does worse
    _epoch(cb, trainer, module, 0.15)
    assert torch.equal(module.weight, best["weight"])  # restored
    assert abs(opt.param_groups[0]["lr"] - 0.1) < 1e-12
    assert cb.decay_points == [2] and cb.effective == 2 and not trainer.should_stop

    _epoch(cb, trainer, module, 0.25)  # improves at the lower lr: effective epoch 3
    _epoch(cb, trainer, module, 0.24)  # second decay
    assert cb.decay_points == [2, 3] and abs(opt.param_groups[0]["lr"] - 0.01) < 1e-12
    _epoch(cb, trainer, module, 0.24)
    assert not trainer.should_stop
    _epoch(cb, trainer, module, 0.24)
    assert trainer.should_stop  # decays spent, then stop_patience=2 flat validations
    assert cb.schedule() == {"epochs": 3, "decay_at": [2, 3], "factor": 0.1}

    # Resume keeps the schedule's state.
    again = PlateauDecay("val/recall@20", tmp_path / "best.ckpt")
    again.load_state_dict(cb.state_dict())
    assert again.schedule()["decay_at"] == [2, 3] and again.best == cb.best


def test_no_decays_is_plain_early_stopping(tmp_path) -> None:
    module = nn.Linear(2, 1)
    trainer = _trainer(torch.optim.SGD(module.parameters(), lr=1.0))
    cb = PlateauDecay("val/recall@20", tmp_path / "best.ckpt", max_decays=0, stop_patience=2)
    for v in (0.1, 0.2, 0.2):
        _epoch(cb, trainer, module, v)
    assert not trainer.should_stop
    _epoch(cb, trainer, module, 0.19)
    assert trainer.should_stop and trainer.optimizers[0].param_groups[0]["lr"] == 1.0


def test_replay_decays_at_recorded_epochs() -> None:
    module = nn.Linear(2, 1)
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    trainer = _trainer(opt)
    cb = ReplayDecay([2, 3], 0.1)
    lrs = []
    for epoch in range(5):
        trainer.current_epoch = epoch
        cb.on_train_epoch_start(trainer, module)
        lrs.append(round(opt.param_groups[0]["lr"], 12))
    assert lrs == [1.0, 1.0, 0.1, 0.01, 0.01]


def test_schedule_counts_epochs_in_a_real_trainer(tmp_path) -> None:
    """Lightning validates before on_train_epoch_end: the recorded schedule must still count the
    validated epoch (a refit replays it)."""
    import pytorch_lightning as pl

    class Flat(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))
            self.scores = [0.1, 0.3, 0.2, 0.2, 0.25, 0.25, 0.25, 0.25, 0.25]

        def training_step(self, batch, i):
            return (self.w - 1).pow(2).sum()

        def validation_step(self, batch, i):
            self.log("val/recall@20", self.scores[self.current_epoch])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0)

    data = torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)
    cb = PlateauDecay("val/recall@20", tmp_path / "best.ckpt", factor=0.1, decay_patience=2, max_decays=1, stop_patience=2)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/recall@20", mode="max")
    trainer = pl.Trainer(max_epochs=9, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb, ckpt], num_sanity_val_steps=0)
    trainer.fit(Flat(), data, data)
    # the 2nd epoch is the best; the 3rd and 4th do not improve -> restore and decay after 2 effective
    # epochs; the 5th and 6th (0.25 < 0.3) do not improve either -> stop (current_epoch counts 6 done).
    assert cb.schedule() == {"epochs": 2, "decay_at": [2], "factor": 0.1}
    assert trainer.current_epoch == 6 and abs(trainer.optimizers[0].param_groups[0]["lr"] - 0.1) < 1e-12
