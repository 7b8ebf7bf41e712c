"""Killing training (SIGKILL, no cleanup) and resuming from the last checkpoint ends within noise of an
uninterrupted run."""

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
