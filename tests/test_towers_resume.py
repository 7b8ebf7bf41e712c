"""Training that stops and starts again: killing it (SIGKILL, no cleanup) and resuming from the last
checkpoint ends within noise of an uninterrupted run; a changed config trains afresh instead of
resuming; a NaN loss stops it with an error naming the step."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from recsys.config import load_config
from tests.tiny_prepared import write_tiny_prepared
from towers import train

SETS = ["train.epochs=6", "train.batch_size=128", "train.num_negatives=32", "data.max_history=20", "train.val_k=10",
        "train.early_stopping_patience=10", "train.max_lr_decays=0", "train.register_model=false", "train.num_threads=1"]

# Runs training in a child process that kills itself (SIGKILL) right after last.ckpt of epoch 3 is written.
CHILD = textwrap.dedent("""
    import os, signal, sys
    from pytorch_lightning.callbacks import ModelCheckpoint
    from recsys.config import load_config
    from towers import train

    original = ModelCheckpoint.on_train_epoch_end

    def save_then_die(self, trainer, pl_module):
        original(self, trainer, pl_module)
        if trainer.current_epoch == 2 and self.filename == "last":
            os.kill(os.getpid(), signal.SIGKILL)

    ModelCheckpoint.on_train_epoch_end = save_then_die
    prep, run_dir, sets = sys.argv[1], sys.argv[2], sys.argv[3:]
    train.run(load_config(None, sets), prep, run_dir, resume=False, progress=False)
    print("NOT KILLED")
""")


def test_kill_and_resume_matches_uninterrupted_run(tmp_path) -> None:
    prep = write_tiny_prepared(tmp_path / "prep")
    cfg = load_config(None, SETS)
    straight = train.run(cfg, prep, tmp_path / "straight", resume=False, progress=False)

    killed = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", CHILD, str(prep), str(killed), *SETS], capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == -9, child.stdout + child.stderr  # really killed, not a clean exit
    assert (killed / "checkpoints" / "last.ckpt").exists() and not (killed / "model").exists()
    # last.ckpt is the epoch the kill followed, whether or not validation improved in it
    last = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2, last["epoch"]

    resumed = train.run(cfg, prep, killed, resume=True, progress=False)
    info = json.loads((killed / "model" / "model.json").read_text())
    assert info["epochs_trained"] == straight["epochs"] == 6  # continued, did not start over
    from recsys.report import read_training_logs

    # the curves of the epochs before the kill are kept
    epochs = [e for e, _ in read_training_logs(killed / "logs" / "towers")["val/recall@10"]]
    assert epochs == [0, 1, 2, 3, 4, 5], epochs
    a, b = straight["val/recall@10"], resumed["val/recall@10"]
    assert a > 0.5 and abs(a - b) < 0.05, (a, b)


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return torch.load(model_dir / "towers.pt", map_location="cpu", weights_only=True)


def test_a_changed_config_trains_afresh_instead_of_resuming_the_old_run(tmp_path) -> None:
    # `recsys fit` reruns training when its config or data changed, with resume on: the old run's
    # last.ckpt must not be continued (it would return the old model under the new config)
    prep = write_tiny_prepared(tmp_path / "prep")
    sets = [*SETS, "train.epochs=2"]
    train.run(load_config(None, sets), prep, tmp_path / "run", resume=False, progress=False)
    old = _weights(tmp_path / "run" / "model")
    changed = load_config(None, [*sets, "train.lr_sparse=0.02"])
    train.run(changed, prep, tmp_path / "run", resume=True, progress=False)
    train.run(changed, prep, tmp_path / "fresh", resume=False, progress=False)
    again, fresh = _weights(tmp_path / "run" / "model"), _weights(tmp_path / "fresh" / "model")
    assert all(torch.equal(again[k], fresh[k]) for k in fresh)  # the same as training from scratch
    assert not torch.equal(again["products.id_emb.weight"], old["products.id_emb.weight"])
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    stored = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["recsys"]
    assert stored["config"]["train"]["lr_sparse"] == 0.02 and stored["vocab_fingerprint"] == train.vocab_fingerprint(prep)


def test_resume_key_ignores_how_training_runs_but_not_what_it_learns(tmp_path) -> None:
    cfg = load_config(None, SETS)
    manifest = {"files": {"examples/train/part-0.parquet": {"sha256": "a"}}}
    key = train.resume_key(cfg, manifest, ("train",), None, None)
    assert train.resume_key(load_config(None, [*SETS, "train.num_threads=2", "train.devices=2"]), manifest, ("train",), None, None) == key
    assert train.resume_key(load_config(None, [*SETS, "train.lr_sparse=0.02"]), manifest, ("train",), None, None) != key
    assert train.resume_key(cfg, {"files": {"examples/train/part-0.parquet": {"sha256": "b"}}}, ("train",), None, None) != key
    assert train.resume_key(cfg, manifest, ("train", "val"), 3, None) != key
    assert not train.resumable(tmp_path / "missing.ckpt", key)
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    assert not train.resumable(tmp_path / "broken.ckpt", key)


def test_a_nan_loss_stops_training_with_an_error_naming_the_step(tmp_path, monkeypatch) -> None:
    import pytest

    from towers.lit_module import TrainingDivergedError, TwoTowerLightning

    prep = write_tiny_prepared(tmp_path / "prep")
    original = TwoTowerLightning.compute_loss
    first_epoch_batches = []

    def poisoned(self, batch):
        loss, parts = original(self, batch)
        if self.current_epoch == 0:
            first_epoch_batches.append(1)
        return (loss * float("nan") if self.current_epoch == 1 else loss), parts

    monkeypatch.setattr(TwoTowerLightning, "compute_loss", poisoned)
    with pytest.raises(TrainingDivergedError, match=r"training loss is nan at global step (\d+) \(epoch 1, batch 0\)") as err:
        train.run(load_config(None, SETS), prep, tmp_path / "run", resume=False, progress=False)
    assert not (tmp_path / "run" / "model").exists()
    # a step is a batch (one optimizer: two made Lightning count two steps a batch)
    step = int(str(err.value).split("global step ")[1].split()[0])
    assert step == len(first_epoch_batches) > 1, (step, len(first_epoch_batches))


def test_a_finished_training_is_trained_again_not_resumed(tmp_path) -> None:
    # resuming a run that ended (early stopping, the last epoch) would restart its stopped schedule
    import csv

    prep = write_tiny_prepared(tmp_path / "prep")
    cfg = load_config(None, [*SETS, "train.epochs=2"])
    first = train.run(cfg, prep, tmp_path / "run", resume=True, progress=False)
    w1 = _weights(tmp_path / "run" / "model")
    again = train.run(cfg, prep, tmp_path / "run", resume=True, progress=False)
    assert again["epochs"] == first["epochs"] == 2
    with open(tmp_path / "run" / "logs" / "towers" / "metrics.csv") as f:
        epochs = {r["epoch"] for r in csv.DictReader(f) if r.get("val/recall@10")}
    assert epochs == {"0", "1"}  # both epochs trained again, not a resumed remainder
    w2 = _weights(tmp_path / "run" / "model")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # and, seeded, to the same weights
