"""``recsys train-ranker``: fit the DCN-v2 ranker on ``RUN_DIR/ranker_data``, tracked in MLflow.

Writes ``RUN_DIR/ranker/`` atomically::

    ranker.pt      state dict (tensors only; load with torch.load(weights_only=True))
    ranker.json    shape, feature names, config, fingerprints, validation metrics, MLflow ids
    towers/        towers.pt + model.json of the two-tower model the features came from (the
                   scorer recomputes user vectors with it; no pickles either)

Lists of the ``train`` phase are split by user into fit / validation (20%, seeded by
``ranking.seed``); the checkpoint with the best validation graded NDCG@10 (the ranker's ordering of
the retrieved candidates, gains = label weights, added positives excluded) is kept.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from data_pipelines.schema import EVENT_CODE
from ranking.data import ListData, RankerDataError, load_lists, read_data_manifest
from ranking.features import CANDIDATE_FEATURES, MODEL_FEATURES, OFFER_FEATURES, USER_FEATURES
from ranking.lit_module import RankerLightning
from ranking.losses import LOSSES
from ranking.model import RankerModel, RankerShape
from recsys.artifacts import atomic_artifact, read_manifest
from recsys.config import Config, fingerprint, to_dict, trainer_precision

log = logging.getLogger(__name__)
WEIGHTS = "ranker.pt"
DESCRIPTION = "ranker.json"
VAL_FRACTION = 0.2
VAL_K = 10
MIN_STEPS_PER_EPOCH = 32


def ranker_shape(cfg: Config, catalog, dim: int) -> RankerShape:
    return RankerShape(
        n_products=catalog.n_products,
        n_sellers=catalog.n_sellers,
        n_categories=catalog.n_categories,
        n_brands=catalog.n_brands,
        dim=int(dim),
        n_product_features=int(catalog.product_num.shape[1]),
        n_seller_features=int(catalog.seller_num.shape[1]),
        cross_layers=int(cfg.ranking.cross_layers),
        hidden=tuple(int(h) for h in cfg.ranking.hidden),
        dropout=float(cfg.model.dropout),
        retrieval_prior=1.0 / float(cfg.model.temperature) if cfg.ranking.residual else 0.0,
    )


def tower_tables(towers, catalog) -> dict[str, torch.Tensor]:
    """Frozen inputs of the ranker: two-tower product / seller vectors and catalog features."""
    from towers.evaluate import all_vectors

    with torch.no_grad():
        return {
            "product_vecs": all_vectors(towers.product_vectors, catalog.n_products).float(),
            "seller_vecs": all_vectors(towers.seller_vectors, catalog.n_sellers).float(),
            "product_cats": catalog.product_cats.long(),
            "product_num": catalog.product_num.float(),
            "seller_num": catalog.seller_num.float(),
        }


def lists_per_batch(n_lists: int, batch_size: int) -> int:
    """``ranking.batch_size`` is the most lists (users) per batch; with few lists the batch shrinks so
    that an epoch still makes ``MIN_STEPS_PER_EPOCH`` optimizer steps (a few large batches per epoch
    under-train the ranker on small data)."""
    return max(1, min(int(batch_size), math.ceil(n_lists / MIN_STEPS_PER_EPOCH)))


def _loader(data: ListData, batch_size: int, shuffle: bool, seed: int, with_rows: bool = False) -> DataLoader:
    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        rows = np.asarray(idx, np.int64)
        b = data.batch(rows)
        if with_rows:
            b["rows"] = torch.from_numpy(rows)
        return b

    g = torch.Generator().manual_seed(int(seed))
    return DataLoader(list(range(len(data))), batch_size=max(1, int(batch_size)), shuffle=shuffle,
                      collate_fn=collate, generator=g if shuffle else None)


def split_users(data: ListData, seed: int, fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows): a seeded share of the lists is held out when there are >= 20."""
    n = len(data)
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction)) if n >= 20 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def fit_lists(
    cfg: Config,
    shape: RankerShape,
    tables: dict[str, torch.Tensor],
    data: ListData,
    work_dir: str | Path,
    n_candidates: int,
    progress: bool = False,
    track: bool = True,
    run_name: str = "ranker",
) -> tuple[RankerModel, dict[str, Any]]:
    """Train a ranker on in-memory lists (the core of :func:`run`; tests call it directly).

    Args:
        work_dir: checkpoints (``checkpoints_ranker/``), CSV logs and, with ``track``, the MLflow store.
        track: log to MLflow (``train.tracking_uri`` / ``train.experiment``).

    Returns:
        (best model in eval mode on the CPU, info: epochs, best validation metrics, MLflow ids, seconds).
    """
    if cfg.ranking.loss not in LOSSES:
        raise ValueError(f"ranking.loss must be one of {', '.join(LOSSES)}, got {cfg.ranking.loss!r}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.ranking.seed, workers=True, verbose=False)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    fit_rows, val_rows = split_users(data, cfg.ranking.seed)
    fit_data = data.subset(fit_rows)
    if cfg.ranking.loss == "listwise":  # lists without any label carry no listwise signal
        fit_data = fit_data.subset(np.flatnonzero((fit_data.label > 0).any(1)))
    if len(fit_data) == 0:
        raise RankerDataError("no labelled training lists: the val split has no events for retrieved users")
    val_data = data.subset(val_rows) if len(val_rows) else None
    has_val = val_data is not None and bool((val_data.label[~val_data.added & val_data.mask] > 0).any())
    lit = RankerLightning(shape.to_dict(), cfg.ranking.loss, cfg.ranking.lr, cfg.train.weight_decay, n_candidates, VAL_K)
    lit.model.set_tables(**tables)
    lit.val_data = val_data if has_val else None
    monitor = f"val/graded_ndcg@{VAL_K}"
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    ckpt_dir = work_dir / "checkpoints_ranker"
    callbacks: list[pl.Callback] = [ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor if has_val else None,
                                                    mode="max", save_last=True, save_top_k=1)]
    if has_val and cfg.train.early_stopping_patience > 0:
        callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=cfg.train.early_stopping_patience))
    loggers: list[Any] = [CSVLogger(str(work_dir), name="logs", version=run_name)]
    mlf = None
    uri = None
    if track:
        from pytorch_lightning.loggers import MLFlowLogger

        from towers import tracking

        uri = tracking.tracking_uri(cfg.train.tracking_uri, work_dir)
        exp_id = tracking.ensure_experiment(uri, cfg.train.experiment, work_dir)
        mlf = MLFlowLogger(experiment_name=cfg.train.experiment, tracking_uri=uri, run_name=f"{run_name}-{work_dir.name}")
        mlf._experiment_id = exp_id
        loggers.insert(0, mlf)
        mlf.log_hyperparams(tracking.flatten({**to_dict(cfg), "ranker_shape": shape.to_dict()}))
    trainer = pl.Trainer(
        max_epochs=int(cfg.ranking.epochs),
        accelerator=cfg.train.accelerator,
        devices=1,
        precision=trainer_precision(cfg.train),
        callbacks=callbacks,
        logger=loggers,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if has_val else 0,
        log_every_n_steps=max(1, min(10, math.ceil(len(fit_data) / lists_per_batch(len(fit_data), cfg.ranking.batch_size)))),
        deterministic=False,
    )
    t0 = time.time()
    bs = lists_per_batch(len(fit_data), cfg.ranking.batch_size)
    val_loader = _loader(val_data, cfg.ranking.batch_size, False, cfg.ranking.seed, True) if has_val else None
    trainer.fit(lit, _loader(fit_data, bs, True, cfg.ranking.seed), val_loader)
    seconds = time.time() - t0
    best_path = callbacks[0].best_model_path or str(ckpt_dir / "last.ckpt")
    state = torch.load(best_path, map_location="cpu", weights_only=False)["state_dict"]
    lit.load_state_dict(state)
    model = lit.model.cpu().eval()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
    best = callbacks[0].best_model_score
    info = {
        "epochs_trained": int(trainer.current_epoch),
        "best_val": {monitor: float(best) if best is not None else None},
        "last_val": metrics,
        "fit_lists": len(fit_data),
        "lists_per_batch": bs,
        "val_lists": len(val_data) if val_data is not None else 0,
        "train_seconds": round(seconds, 1),
        "mlflow": {"tracking_uri": uri, "run_id": mlf.run_id} if mlf is not None else {},
    }
    return model, info


def save_ranker(model: RankerModel, directory: Path, desc: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, directory / WEIGHTS)
    (directory / DESCRIPTION).write_text(json.dumps({"shape": model.shape.to_dict(), **desc}, indent=2, sort_keys=True,
                                                    default=str))


def load_ranker(directory: str | Path, device: str = "cpu") -> tuple[RankerModel, dict[str, Any]]:
    """Rebuild a ranker from ``RUN_DIR/ranker`` without unpickling (``weights_only=True``)."""
    directory = Path(directory)
    desc = json.loads((directory / DESCRIPTION).read_text())
    model = RankerModel(RankerShape.from_dict(desc["shape"]))
    model.load_state_dict(torch.load(directory / WEIGHTS, map_location=device, weights_only=True))
    return model.to(device).eval(), desc


def run(cfg: Config, run_dir: str | Path, progress: bool = False) -> dict[str, Any]:
    """Train the ranker on ``RUN_DIR/ranker_data`` and write ``RUN_DIR/ranker``.

    Returns:
        Summary: ranker dir, best validation NDCG@10 (ranker and retrieval order), epochs, seconds,
        MLflow run id and registered version.
    """
    from retrieval.common import link_or_copy, model_version
    from towers.catalog import load_catalog
    from towers.checkpoint import DESCRIPTION as TOWER_DESC
    from towers.checkpoint import WEIGHTS as TOWER_WEIGHTS
    from towers.checkpoint import load_towers

    run_dir = Path(run_dir)
    dman = read_data_manifest(run_dir)
    mman = read_manifest(run_dir / "model")
    if dman.get("model_created_at") != mman.get("created_at"):
        raise RankerDataError(f"{run_dir / 'ranker_data'} was built from another towers model than {run_dir / 'model'}; "
                              "rerun the ranker data stage")
    n_cand = int(dman["candidates"])
    if "train" not in dman.get("phases", {}):
        raise RankerDataError(f"{run_dir / 'ranker_data'} has no training lists: the prepared data has no val split "
                              "(the ranker learns from the val period; use a temporal or leave-last-out split)")
    tmask = sum(1 << EVENT_CODE[e] for e in dman.get("target_events", ["purchase"]))
    data = load_lists(run_dir / "ranker_data", "train", n_cand, tmask)
    towers, tdesc = load_towers(run_dir / "model")
    catalog = load_catalog(dman["prepared"])
    shape = ranker_shape(cfg, catalog, towers.shape.dim)
    model, info = fit_lists(cfg, shape, tower_tables(towers, catalog), data, run_dir, n_cand, progress)
    resolved = to_dict(cfg)
    desc = {
        "config": resolved,
        "config_fingerprint": fingerprint(resolved),
        "vocab_fingerprint": tdesc.get("vocab_fingerprint"),
        "towers_model_version": model_version(mman, tdesc),
        "prepared": dman["prepared"],
        "candidates": n_cand,
        "max_history": int(dman["max_history"]),
        "history_window": int(dman["history_window"]),
        "target_events": dman.get("target_events"),
        "loss": cfg.ranking.loss,
        "features": {"offer": list(OFFER_FEATURES), "user": list(USER_FEATURES),
                     "candidate": list(CANDIDATE_FEATURES), "model": list(MODEL_FEATURES)},
        "data_created_at": dman.get("created_at"),
        **info,
    }
    out = run_dir / "ranker"
    with atomic_artifact(out, {"stage": "train_ranker", **{k: v for k, v in desc.items() if k != "config"}}) as tmp:
        save_ranker(model, tmp, desc)
        for name in (TOWER_WEIGHTS, TOWER_DESC):
            link_or_copy(run_dir / "model" / name, tmp / "towers" / name)
        (tmp / "towers" / "model_manifest.json").write_text(json.dumps(mman, indent=2, sort_keys=True))
    summary = {
        "ranker_dir": str(out),
        **{k: info[k] for k in ("epochs_trained", "best_val", "last_val", "fit_lists", "val_lists", "lists_per_batch",
                                "train_seconds")},
        "mlflow_run_id": info["mlflow"].get("run_id"),
    }
    if info["mlflow"].get("run_id"):
        summary["registered_version"] = _log_model(cfg, info["mlflow"], out, info["best_val"].get(f"val/graded_ndcg@{VAL_K}"))
    (run_dir / "train_summary_ranker.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _log_model(cfg: Config, mlf: dict[str, Any], ranker_dir: Path, value: float | None) -> str | None:
    from mlflow.tracking import MlflowClient

    from towers import tracking

    client = MlflowClient(mlf["tracking_uri"])
    client.log_artifacts(mlf["run_id"], str(ranker_dir), artifact_path="ranker")
    if not cfg.train.register_model:
        return None
    source = f"{client.get_run(mlf['run_id']).info.artifact_uri}/ranker"
    return tracking.register(client, f"{cfg.train.experiment}-ranker", source, mlf["run_id"],
                             f"val_graded_ndcg_at_{VAL_K}", value or 0.0)
