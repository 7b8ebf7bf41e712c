"""Data-parallel training (DDP) on CPU with two processes (gloo): the launcher, and a real fit."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch

from tests.tiny_prepared import write_tiny_prepared
from towers import ddp
from towers.datamodule import TowerDataModule


def test_local_processes() -> None:
    assert ddp.local_processes("auto", "cpu", 1) == 1
    assert ddp.local_processes("auto", "cpu", 2) == 2
    assert ddp.local_processes("ddp", "gpu", 4) == 4
    with pytest.raises(ValueError, match="train.strategy='fsdp'"):
        ddp.local_processes("fsdp", "gpu", 2)
    with pytest.raises(ValueError, match="train.devices must be >= 1"):
        ddp.local_processes("auto", "cpu", 0)
    with pytest.raises(ValueError, match="needs train.accelerator=gpu"):
        ddp.local_processes("auto", "cpu", -1)


@pytest.fixture
def clean_launch_env(monkeypatch):
    for k in (*ddp.LAUNCH_ENV, "RANK"):
        monkeypatch.delenv(k, raising=False)


def test_worker_processes_start_ranks_and_restore_the_environment(tmp_path, clean_launch_env) -> None:
    code = "import os; print('rank', os.environ['LOCAL_RANK'], 'of', os.environ['WORLD_SIZE'])"
    with ddp.worker_processes(3, [sys.executable, "-c", code], tmp_path):
        assert os.environ["LOCAL_RANK"] == "0" and os.environ["WORLD_SIZE"] == "3"
        assert ddp.process_rank() == 0 and ddp.externally_launched()
    assert "LOCAL_RANK" not in os.environ and "MASTER_PORT" not in os.environ
    assert (tmp_path / "rank1.log").read_text().strip() == "rank 1 of 3"
    assert (tmp_path / "rank2.log").read_text().strip() == "rank 2 of 3"


def test_a_failing_worker_interrupts_rank_zero_with_its_rank_and_log(tmp_path, clean_launch_env) -> None:
    code = "import sys; print('worker broke'); sys.exit(3)"
    t = time.monotonic()
    with pytest.raises(RuntimeError, match=r"training rank 1 exited with status 3; its log: .*rank1\.log") as err:
        with ddp.worker_processes(2, [sys.executable, "-c", code], tmp_path):
            while time.monotonic() - t < 60:  # stands for rank 0 waiting in the fit
                time.sleep(0.05)
    assert "worker broke" in str(err.value)
    assert time.monotonic() - t < 30
    assert "LOCAL_RANK" not in os.environ


def test_workers_are_killed_when_rank_zero_fails(tmp_path, clean_launch_env) -> None:
    code = "import time; time.sleep(120)"
    with pytest.raises(ValueError, match="rank 0 failed"):
        with ddp.worker_processes(2, [sys.executable, "-c", code], tmp_path):
            (tmp_path / "started").write_text("")
            raise ValueError("rank 0 failed")
    # the log file is closed and the sleeping worker gone: a second launch in the same place works
    with ddp.worker_processes(2, [sys.executable, "-c", "pass"], tmp_path):
        pass


@pytest.mark.parametrize("n", [0, 1, 5, 6])
def test_validation_rows_are_shared_without_repeats(tmp_path, n) -> None:
    dm = TowerDataModule(tmp_path, batch_size=4, max_history=5, val_batch_users=2)
    dm.val_queries = list(range(n))
    seen, lengths = [], set()
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        rows = torch.cat(list(dm.val_dataloader())) if n else torch.zeros(0, dtype=torch.long)
        lengths.add(len(rows))
        seen += rows[rows >= 0].tolist()
    assert sorted(seen) == list(range(n)) and len(lengths) == 1


SETS = ["train.epochs=3", "train.batch_size=64", "train.num_negatives=32", "data.max_history=20", "train.val_k=10",
        "train.max_lr_decays=0", "train.register_model=false", "train.num_threads=1", "eval.batch_users=16",
        # seller tasks of weight 0 leave the seller tower out of the loss: DDP must allow unused parameters
        "train.task_weights.user_seller=0", "train.task_weights.product_seller=0"]

# Trains in a child process (DDP changes process-wide state), then validates the last checkpoint
# in one process with the same code: the two must agree on every validation user.
CHILD = textwrap.dedent("""
    import json, sys
    import pytorch_lightning as pl
    import torch
    from recsys.config import load_config
    from towers import train
    from towers.lit_module import TwoTowerLightning

    prep, run_dir, sets = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = load_config(None, sets)
    summary = train.run(cfg, prep, run_dir, resume=False, progress=False)
    ck = torch.load(f"{run_dir}/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    lit = TwoTowerLightning(**ck["hyper_parameters"])
    lit.load_state_dict(ck["state_dict"])
    dm = train.datamodule(cfg, prep)
    dm.setup()
    lit.val_queries = dm.val_queries
    out = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).validate(lit, datamodule=dm, verbose=False)
    print("RESULT", json.dumps({"summary": summary, "single": out[0], "n_val": len(dm.val_queries)}))
""")


def test_two_process_cpu_fit_trains_once_and_validates_every_user_once(tmp_path) -> None:
    # 301 users: an odd number of validation users, which a padding sampler would count one twice
    prep = write_tiny_prepared(tmp_path / "prep", n_users=301)
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in (*ddp.LAUNCH_ENV, "RANK")}
    child = subprocess.run([sys.executable, "-c", CHILD, str(prep), str(run_dir), "train.devices=2", *SETS],
                           capture_output=True, text=True, timeout=600, env=env)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    result = json.loads(child.stdout.split("RESULT", 1)[1])
    assert result["n_val"] == 301
    # rank 1 really trained, and wrote nothing but its log
    log1 = (run_dir / "logs" / "ddp_model" / "rank1.log").read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log1, log1[-2000:]
    assert json.loads((run_dir / "model" / "model.json").read_text())["epochs_trained"] == 3
    assert not list(run_dir.glob("train_summary_*rank*")) and len(list(run_dir.glob("train_summary_*.json"))) == 1
    with open(run_dir / "logs" / "towers" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/recall@10")]
    logged = {k: [float(r[k]) for r in rows] for k in ("val/recall@10", "val/ndcg@10", "val/mrr")}
    assert len(rows) == 3
    # the DDP run's last validation (sums over both ranks) equals one process validating the same weights
    for name in ("val/recall@10", "val/ndcg@10", "val/mrr"):
        assert logged[name][-1] == pytest.approx(result["single"][name], abs=1e-6), name
    assert result["summary"]["val/recall@10"] > 0.5  # it learned the planted clusters


def test_a_worker_failing_after_the_fit_is_a_warning(tmp_path, clean_launch_env, caplog) -> None:
    code = "import sys, time; time.sleep(0.5); sys.exit(4)"
    with caplog.at_level("WARNING", logger="towers.ddp"):
        with ddp.worker_processes(2, [sys.executable, "-c", code], tmp_path):
            pass  # rank 0's fit ended before the worker failed
    assert "training rank 1 exited with status 4" in caplog.text
