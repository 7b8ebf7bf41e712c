"""Several batches per Lightning step: the same training, one optimizer step per batch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from recsys.config import load_config
from tests.tiny_prepared import write_tiny_prepared
from towers import train
from towers.batch_groups import BatchGroups
from towers.step_checkpoint import StepCheckpoint


def test_groups_keep_order_and_the_short_last_group() -> None:
    groups = BatchGroups(list(range(10)), 4)
    assert len(groups) == 3 and list(groups) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(BatchGroups(list(range(3)), 1)) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="train.batches_per_call"):
        BatchGroups([], 0)


def test_weights_and_step_count_do_not_depend_on_batches_per_call(tmp_path) -> None:
    prep = write_tiny_prepared(tmp_path / "prep")
    sets = ["train.epochs=2", "train.batch_size=128", "train.num_negatives=32", "data.max_history=20",
            "train.register_model=false", "train.num_threads=1", "train.max_lr_decays=0"]
    weights, steps = {}, {}
    for k in (1, 3):
        run = tmp_path / f"k{k}"
        train.run(load_config(None, [*sets, f"train.batches_per_call={k}"]), prep, run, resume=False, progress=False)
        weights[k] = torch.load(run / "model" / "towers.pt", map_location="cpu", weights_only=True)
        steps[k] = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert steps[1] == steps[3] > 6  # optimizer steps = batches, whatever the grouping
    assert weights[1].keys() == weights[3].keys()
    assert all(torch.equal(weights[1][n], weights[3][n]) for n in weights[1])


def test_step_checkpoint_saves_each_time_a_multiple_is_passed(tmp_path) -> None:
    saved = []
    trainer = SimpleNamespace(global_step=0, save_checkpoint=lambda path: saved.append((trainer.global_step, path)))
    cb = StepCheckpoint(tmp_path / "last.ckpt", 5)
    cb.on_train_start(trainer, None)
    # three batches per Lightning step, an epoch of 7 batches: 3, 6, 7, then 10, 13, 14
    for step in (3, 6, 7, 10, 13, 14):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, None, None, None, 0)
    assert [s for s, _ in saved] == [6, 10]
    assert all(p == tmp_path / "last.ckpt" for _, p in saved)
    resumed = StepCheckpoint(tmp_path / "last.ckpt", 5)
    trainer.global_step = 12  # resumed from a checkpoint at step 12: the next save passes 15
    resumed.on_train_start(trainer, None)
    for step in (13, 14, 16):
        trainer.global_step = step
        resumed.on_train_batch_end(trainer, None, None, None, 0)
    assert [s for s, _ in saved] == [6, 10, 16]
