"""``recsys train``: fit the towers on a prepared artifact, select by validation Recall@K, track in MLflow."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, Timer

from recsys.artifacts import atomic_artifact, read_manifest
from recsys.config import TRAINING_EVAL_KEYS, Config, fingerprint, to_dict, trainer_precision
from towers import ddp, tracking
from towers.allocator import retain_freed_memory
from towers.catalog import load_catalog
from towers.checkpoint import save_towers
from towers.datamodule import TowerDataModule
from towers.item_neighbors import neighbors_from_examples
from towers.lit_module import TwoTowerLightning
from towers.lr_schedule import PlateauDecay, ReplayDecay
from towers.popularity_prior import select_prior
from towers.shapes import TowerShape
from towers.step_checkpoint import StepCheckpoint

log = logging.getLogger(__name__)


def tower_shape(cfg: Config, catalog) -> TowerShape:
    """Tower sizes from the catalog and the ``model`` section."""
    m = cfg.model
    return TowerShape(
        n_users=catalog.n_users,
        n_products=catalog.n_products,
        n_sellers=catalog.n_sellers,
        n_categories=catalog.n_categories,
        n_brands=catalog.n_brands,
        n_product_features=int(catalog.product_num.shape[1]),
        n_seller_features=int(catalog.seller_num.shape[1]),
        dim=m.dim,
        hidden=m.hidden,
        history_pooling=m.history_pooling,
        use_user_id=m.use_user_id,
        separate_history=m.separate_history,
        item_neighbors=m.item_neighbors,
        item_bias=m.item_bias,
        user_hash_buckets=m.user_hash_buckets,
        use_features=m.use_features,
        # also under multi-GPU DDP: the tables' gradients are exchanged outside DDP (towers.sparse_grad_sync)
        sparse=m.sparse_embeddings,
        dropout=m.dropout,
        temperature=m.temperature,
        learn_temperature=m.learn_temperature,
    )


# train settings that say how to run, not what to learn: changing them does not prevent a resume
RUN_ONLY_SETTINGS = ("num_threads", "num_workers", "devices", "accelerator", "strategy", "max_minutes", "tracking_uri",
                     "experiment", "register_model", "huge_pages", "retain_freed_memory", "loader", "checkpoint_every_n_steps",
                     "batches_per_call")

# the optimizer state a checkpoint holds: a checkpoint of another layout (two optimizers before
# TowerAdam) cannot be resumed by this code, so it is not offered
OPTIMIZER_LAYOUT = "TowerAdam/1"


def resume_key(cfg: Config, prep_manifest: dict, train_splits, epochs: int | None, lr_schedule: dict | None) -> str:
    """Fingerprint of everything a towers training depends on: the config it reads (less
    :data:`RUN_ONLY_SETTINGS`; of ``eval`` only ``TRAINING_EVAL_KEYS``), the prepared files' checksums,
    the splits, the epochs and the schedule."""
    train_cfg = {k: v for k, v in to_dict(cfg.train).items() if k not in RUN_ONLY_SETTINGS}
    eval_cfg = {k: v for k, v in to_dict(cfg.eval).items() if k in TRAINING_EVAL_KEYS}
    return fingerprint({"optimizer": OPTIMIZER_LAYOUT, "data": to_dict(cfg.data), "model": to_dict(cfg.model),
                        "train": train_cfg, "eval": eval_cfg, "files": prep_manifest.get("files", {}), "train_splits": list(train_splits), "epochs": epochs,
                        "lr_schedule": lr_schedule or {}})


def resumable(ckpt: Path, key: str) -> bool:
    """Whether ``ckpt`` exists and was written by a training with this :func:`resume_key`."""
    if not ckpt.exists():
        return False
    try:
        # mmap: the id tables are not read to get at the small "recsys" entry
        stored = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=False).get("recsys") or {}
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        log.warning("cannot read %s (%s): training starts over", ckpt, e)
        return False
    return stored.get("resume_key") == key


def last_checkpoint(ckpt_dir: Path) -> ModelCheckpoint:
    """A callback that overwrites ``ckpt_dir/last.ckpt`` at every epoch end."""
    return ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)


def datamodule(cfg: Config, prepared: str | Path, train_splits: tuple[str, ...] = ("train",)) -> TowerDataModule:
    """The towers' data module for ``cfg``: validation (model selection) only when training on ``("train",)``."""
    return TowerDataModule(
        prepared,
        batch_size=cfg.train.batch_size,
        max_history=cfg.data.max_history,
        loader=cfg.train.loader,
        num_workers=cfg.train.num_workers,
        seed=cfg.train.seed,
        target_events=cfg.eval.target_events,
        bought_events=cfg.data.bought_events,
        val_max_users=cfg.train.val_max_users,
        val_batch_users=cfg.eval.batch_users,
        train_splits=tuple(train_splits),
        validate=tuple(train_splits) == ("train",),
        batches_per_call=cfg.train.batches_per_call,
    )


def vocab_fingerprint(prepared: str | Path) -> str:
    """Checksums of the vocabulary files: training and serving must map ids identically."""
    files = read_manifest(prepared).get("files", {})
    vocab = {k: v["sha256"] for k, v in sorted(files.items()) if k.startswith("vocab/")}
    return fingerprint(vocab)


def run(
    cfg: Config,
    prepared: str | Path,
    run_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    train_splits: tuple[str, ...] = ("train",),
    epochs: int | None = None,
    out_name: str = "model",
    lr_schedule: dict[str, Any] | None = None,
    popularity_prior: float | None = None,
) -> dict[str, Any]:
    """Train the towers and write ``RUN_DIR/<out_name>`` (weights, description, manifest).

    Args:
        cfg: resolved configuration.
        prepared: prepared artifact directory (from ``recsys prepare``).
        run_dir: where checkpoints, the MLflow store and the model artifact go.
        resume: continue from ``RUN_DIR/checkpoints[_<out_name>]/last.ckpt`` when it exists, was
            written by this same training (:func:`resume_key`) and that training did not finish;
            otherwise train from scratch (removing the old checkpoints).
        progress: show Lightning's progress bar.
        train_splits: example splits to train on; validation (model selection, early stopping)
            runs only when this is just ``("train",)``.
        epochs: a fixed number of epochs (refit), else ``train.epochs`` with early stopping.
        out_name: the model directory name under the run directory.
        lr_schedule: a schedule recorded by :class:`PlateauDecay` to replay without validation (refit).
        popularity_prior: the popularity weight to store when there is no validation to choose it
            (refit: the selected model's), else the validation choice from ``train.popularity_prior_grid``.

    Returns:
        Summary with the best validation metric, epochs, timing and paths.
    """
    prepared, run_dir = Path(prepared), Path(run_dir)
    train_splits = tuple(train_splits)
    processes = ddp.local_processes(cfg.train.strategy, cfg.train.accelerator, cfg.train.devices)
    rank = ddp.process_rank()
    run_dir.mkdir(parents=True, exist_ok=True)
    prep_manifest = read_manifest(prepared)
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    # several CPU ranks share the cores: each gets its part (all of them would oversubscribe)
    torch.set_num_threads(cfg.train.num_threads or max(1, (os.cpu_count() or 1) // processes))
    if cfg.train.retain_freed_memory:
        retain_freed_memory()
    catalog = load_catalog(prepared)
    shape = tower_shape(cfg, catalog)
    tcfg = to_dict(cfg.train)
    lit = TwoTowerLightning(shape.to_dict(), tcfg, {"history_dropout": cfg.model.history_dropout, "history_horizon": cfg.model.history_horizon}, cfg.eval.ks[:3])
    lit.set_catalog(catalog)
    if shape.item_neighbors > 0:
        # from the splits this model trains on: held-out interactions must not shape the neighbours
        nbrs = neighbors_from_examples(prepared, train_splits, shape.n_products, shape.item_neighbors, cfg.train.seed)
        lit.model.products.set_neighbors(torch.from_numpy(nbrs))
    dm = datamodule(cfg, prepared, train_splits)
    dm.setup()
    lit.val_queries = dm.val_queries
    has_val = dm.val_queries is not None and len(dm.val_queries) > 0
    monitor = f"val/recall@{cfg.train.val_k}"
    ckpt_dir = run_dir / ("checkpoints" if out_name == "model" else f"checkpoints_{out_name}")
    callbacks: list[pl.Callback] = [
        # without validation every epoch is "best", and save_last then writes last.ckpt every epoch too
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor if has_val else None, mode="max", save_top_k=1,
                        save_last=not has_val)
    ]
    if has_val:
        # last.ckpt, what a resume starts from, after every epoch: Lightning 2.6's save_last=True
        # writes it only when the monitored metric improves, and a resume would redo the epochs since
        callbacks.append(last_checkpoint(ckpt_dir))
    if cfg.train.checkpoint_every_n_steps > 0:
        callbacks.append(StepCheckpoint(ckpt_dir / "last.ckpt", cfg.train.checkpoint_every_n_steps))
    plateau = None
    if has_val:
        plateau = PlateauDecay(monitor, ckpt_dir / "best.ckpt", cfg.train.lr_decay_factor, cfg.train.lr_decay_patience,
                               cfg.train.max_lr_decays, cfg.train.early_stopping_patience)
        callbacks.append(plateau)
    elif lr_schedule and lr_schedule.get("decay_at"):
        callbacks.append(ReplayDecay(lr_schedule["decay_at"], float(lr_schedule.get("factor", cfg.train.lr_decay_factor))))
    if cfg.train.max_minutes > 0:
        callbacks.append(Timer(duration={"minutes": cfg.train.max_minutes}))

    ckpt_path = ckpt_dir / "last.ckpt"
    # Checkpoints carry what they were trained with (the issue: "checkpoints store the resolved config
    # and vocab fingerprint"), and a resume must continue the same training: `recsys fit` reruns this
    # stage when its config or data changed, and resuming the old last.ckpt would return the old model.
    resolved = to_dict(cfg)
    lit.run_info = {"resume_key": resume_key(cfg, prep_manifest, train_splits, epochs, lr_schedule),
                    "config": resolved, "vocab_fingerprint": vocab_fingerprint(prepared)}
    # a training that ran to its end is not resumed: it would restart its stopped schedule
    finished = ckpt_dir / "finished.txt"
    resuming = resume and not finished.exists() and resumable(ckpt_path, lit.run_info["resume_key"])
    if rank != 0:  # a data-parallel worker: join the fit; rank 0 logs, checkpoints and writes the model
        trainer = pl.Trainer(**_trainer_args(cfg, epochs, callbacks, False, False, has_val, processes))
        trainer.fit(lit, datamodule=dm, ckpt_path=str(ckpt_path) if resuming else None)
        return {"rank": rank}
    uri = tracking.tracking_uri(cfg.train.tracking_uri, run_dir)
    exp_id = tracking.ensure_experiment(uri, cfg.train.experiment, run_dir)
    from pytorch_lightning.loggers import CSVLogger, MLFlowLogger

    mlf = MLFlowLogger(experiment_name=cfg.train.experiment, tracking_uri=uri, run_name=f"towers-{out_name}-{run_dir.name}")
    mlf._experiment_id = exp_id
    existing = ckpt_dir / "mlflow_run_id.txt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        if resume and ckpt_path.exists() and not finished.exists():
            log.warning("%s is from another training (config, data or schedule changed): training starts over", ckpt_path)
        # A fresh start must not meet the last run's files: PlateauDecay would restore its best.ckpt,
        # and ModelCheckpoint would write best-v1.ckpt beside it.
        for old in [*ckpt_dir.glob("*.ckpt"), finished]:
            old.unlink(missing_ok=True)
    cfg_fp = fingerprint(resolved)
    if resuming and existing.exists():
        # Resume into the same MLflow run only with the same config: MLflow refuses changed params.
        stored = existing.read_text().split()
        if len(stored) == 2 and stored[1] == cfg_fp:
            mlf._run_id = stored[0]
    # One CSV log per trained model (the refit must not overwrite the selection run's curves). Lightning
    # deletes an existing metrics.csv when it resumes, so the epochs before a resume are kept as
    # metrics.partN.csv; a fresh start drops the curves of the run it replaces.
    version = "towers" if out_name == "model" else f"towers_{out_name}"
    csv_dir = run_dir / "logs" / version
    parts = sorted(csv_dir.glob("metrics.part*.csv"))
    if resuming and (csv_dir / "metrics.csv").exists():
        (csv_dir / "metrics.csv").rename(csv_dir / f"metrics.part{len(parts)}.csv")
    elif not resuming:
        for p in parts:
            p.unlink()
    loggers = [mlf, CSVLogger(str(run_dir), name="logs", version=version)]
    t0 = time.time()
    mlf.log_hyperparams(tracking.flatten(resolved))
    existing.write_text(f"{mlf.run_id} {cfg_fp}")
    worker_dir = run_dir / "logs" / f"ddp_{out_name}"
    if processes > 1 and not ddp.externally_launched():
        # the workers repeat this call: same config and arguments, resuming exactly when rank 0 does
        worker_dir.mkdir(parents=True, exist_ok=True)
        spec = {"config": resolved, "run": {
            "prepared": str(prepared.resolve()), "run_dir": str(run_dir.resolve()), "resume": resuming, "progress": False,
            "train_splits": list(train_splits), "epochs": epochs, "out_name": out_name,
            "lr_schedule": lr_schedule, "popularity_prior": popularity_prior}}
        (worker_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    command = [sys.executable, "-m", "towers.ddp_worker", str((worker_dir / "spec.json").resolve())]
    with ddp.worker_processes(processes, command, worker_dir):
        trainer = pl.Trainer(**_trainer_args(cfg, epochs, callbacks, loggers, progress, has_val, processes))
        trainer.fit(lit, datamodule=dm, ckpt_path=str(ckpt_path) if resuming else None)
    train_seconds = time.time() - t0
    finished.write_text(lit.run_info["resume_key"])

    best_path = callbacks[0].best_model_path or str(ckpt_path)
    best_score = callbacks[0].best_model_score
    state = torch.load(best_path, map_location="cpu", weights_only=False)["state_dict"]
    lit.load_state_dict(state)
    model = lit.model.cpu().eval()
    grid = tuple(cfg.train.popularity_prior_grid)
    prior_table: dict[str, Any] = {}
    if has_val:
        prior, prior_table = select_prior(model, dm.val_queries, grid, cfg.train.val_k, cfg.eval.batch_users)
    elif popularity_prior is not None:
        prior = float(popularity_prior)
    else:
        prior = float(grid[0]) if len(grid) == 1 else 0.0
    model.set_popularity_prior(prior)
    extra = {
        "config": resolved,
        "config_fingerprint": cfg_fp,
        "vocab_fingerprint": vocab_fingerprint(prepared),
        "prepared": str(prepared.resolve()),
        "prepared_created_at": prep_manifest.get("created_at"),
        "best_val": {monitor: float(best_score) if best_score is not None else None},
        "epochs_trained": int(trainer.current_epoch),
        "best_epoch": _best_epoch(best_path, trainer.current_epoch),
        "lr_schedule": plateau.schedule() if plateau is not None else (lr_schedule or {}),
        "popularity_prior": {"weight": prior, "validation": prior_table},
        "train_splits": list(train_splits),
        "train_seconds": round(train_seconds, 1),
        "mlflow": {"tracking_uri": uri, "run_id": mlf.run_id},
    }
    model_dir = run_dir / out_name
    with atomic_artifact(model_dir, {"stage": "train", **extra}) as tmp:
        save_towers(model, tmp, extra)
    summary = {
        "model_dir": str(model_dir),
        "best_checkpoint": best_path,
        monitor: extra["best_val"][monitor],
        "epochs": extra["epochs_trained"],
        "best_epoch": extra["best_epoch"],
        "popularity_prior": prior,
        "train_seconds": extra["train_seconds"],
        "mlflow_run_id": mlf.run_id,
        "tracking_uri": uri,
    }
    _log_model(uri, mlf.run_id, model_dir, cfg, monitor, extra["best_val"][monitor])
    (run_dir / f"train_summary_{out_name}.json").write_text(json.dumps(summary, indent=2))
    return summary


def _trainer_args(cfg: Config, epochs: int | None, callbacks: list[pl.Callback], loggers, progress: bool,
                  has_val: bool, processes: int) -> dict[str, Any]:
    """``pl.Trainer`` arguments of a towers fit (the same on every data-parallel rank but the loggers)."""
    return dict(
        max_epochs=epochs or cfg.train.epochs,
        accelerator=cfg.train.accelerator,
        devices=cfg.train.devices,
        strategy=ddp.lightning_strategy(cfg.train.strategy, processes),
        precision=trainer_precision(cfg.train),
        callbacks=callbacks,
        logger=loggers,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=cfg.train.val_every_n_epochs,
        limit_val_batches=1.0 if has_val else 0,
        reload_dataloaders_every_n_epochs=1,
        log_every_n_steps=50,
        deterministic=False,
        # the training loaders shard by rank themselves and the validation loader is sharded without
        # padding (TowerDataModule); Lightning's DistributedSampler would repeat validation users
        use_distributed_sampler=False,
    )


def _best_epoch(path: str, fallback: int) -> int:
    """Epoch count (1-based) stored in a Lightning checkpoint."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"]) + 1
    except (OSError, KeyError, RuntimeError):
        return int(fallback)


def refit(cfg: Config, prepared: str | Path, run_dir: str | Path, include_test: bool, progress: bool = True) -> dict[str, Any]:
    """Retrain on every split the user gave (train + val, + test when we carved it) for the selected
    number of epochs, into ``RUN_DIR/model_full``: the model that export and serving use.

    Args:
        include_test: train on the test split too (true unless the source predefined the test split).
    """
    info = json.loads((Path(run_dir) / "model" / "model.json").read_text())
    schedule = info.get("lr_schedule") or {}
    # Effective epochs: epochs discarded by a restore-on-plateau do not count.
    best = schedule.get("epochs") or info.get("best_epoch") or cfg.train.epochs
    splits = ("train", "val", "test") if include_test else ("train", "val")
    prior = (info.get("popularity_prior") or {}).get("weight", 0.0)
    return run(cfg, prepared, run_dir, resume=False, progress=progress, train_splits=splits, epochs=int(best),
               out_name="model_full", lr_schedule=schedule, popularity_prior=prior)


def _log_model(uri: str, run_id: str, model_dir: Path, cfg: Config, metric: str, value: float | None) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    client.log_artifacts(run_id, str(model_dir), artifact_path="towers")
    if cfg.train.register_model:
        source = f"{client.get_run(run_id).info.artifact_uri}/towers"
        tracking.register(client, f"{cfg.train.experiment}-two-tower", source, run_id, metric.replace("/", "_").replace("@", "_at_"), value or 0.0)
    mlflow.set_tracking_uri(uri)
