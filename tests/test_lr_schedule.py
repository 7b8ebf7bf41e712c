"""The plateau schedule: restore best weights + decay, stop when spent, and its replay in a refit."""

from types import SimpleNamespace

import torch
from torch import nn

from towers.lr_schedule import PlateauDecay, ReplayDecay


def _trainer(opt):
    return SimpleNamespace(optimizers=[opt], callback_metrics={}, sanity_checking=False, should_stop=False, current_epoch=0)


def _epoch(cb, trainer, module, value):
    cb.on_train_epoch_end(trainer, module)
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
