"""``recsys export``: embeddings of every product, seller and known user from the exact trained towers.

Writes ``RUN_DIR/export/`` atomically::

    products.parquet, sellers.parquet, users.parquet   id:string, index:int32, vector:list<float32>
    products.npy, sellers.npy, users.npy               float32 [N, d], same row order as the Parquet
    products_idx.npy, sellers_idx.npy, users_idx.npy   int64 [N] model indexes of the rows
    products_offsets.npy                               float32 [N] popularity offset of each product row
    manifest.json    model version, vocabulary fingerprint, dim, normalisation "l2", metric, counts, checksums

Users are embedded from their id and their history in ``histories/full`` (all accepted events, the
last ``data.max_history`` items, as at serving time; no hour/day context). Vectors are unit length,
so the inner product is the model's cosine score; a product's score adds its offset
(``TwoTowerModel.product_offsets``: the popularity prior chosen on validation, 0 without one), which
the product index holds as an extra dimension.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_pipelines.arrays import pad_list_column
from recsys.artifacts import ArtifactError, atomic_artifact, read_manifest
from recsys.config import Config
from retrieval.common import (
    METRIC,
    NORMALISATION,
    RetrievalError,
    column,
    max_history,
    model_version,
    read_table,
    read_vocab,
    save_npy,
    vocab_fingerprint_from_files,
)
from towers.checkpoint import load_towers, serving_model_dir


class ExportError(RetrievalError):
    """The model or the prepared artifact cannot be exported (missing, or vocabularies differ)."""


def _item_vectors(fn, idx: np.ndarray, batch: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for s in range(0, len(idx), batch):
            out.append(fn(torch.from_numpy(idx[s : s + batch])).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def history_matrix(
    prepared: Path, user_idx: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned, 0-padded last ``width`` products and sellers of each user in ``histories/full``."""
    hp = np.zeros((len(user_idx), width), np.int64)
    hs = np.zeros((len(user_idx), width), np.int64)
    t = read_table(prepared / "histories" / "full.parquet", ["user_idx", "products", "sellers"])
    if t is None or t.num_rows == 0 or width == 0:
        return hp, hs
    hu = column(t, "user_idx", np.int64)
    p, _ = pad_list_column(t["products"], width)
    s, _ = pad_list_column(t["sellers"], width) if "sellers" in t.column_names else (np.zeros_like(p), None)
    order = np.argsort(hu, kind="stable")
    pos = np.clip(np.searchsorted(hu[order], user_idx), 0, max(len(hu) - 1, 0))
    rows = order[pos]
    ok = hu[rows] == user_idx
    hp[ok] = p[rows[ok]]
    hs[ok] = s[rows[ok]]
    return hp, hs


def user_vectors(model, user_idx: np.ndarray, hp: np.ndarray, hs: np.ndarray, batch: int) -> np.ndarray:
    """Unit user vectors [U, d] from ids and padded histories (hour/day unknown)."""
    out = []
    with torch.no_grad():
        for s in range(0, len(user_idx), batch):
            e = slice(s, s + batch)
            n = len(user_idx[e])
            out.append(
                model.user_vectors(
                    {
                        "user_idx": torch.from_numpy(user_idx[e]),
                        "hist_products": torch.from_numpy(hp[e]),
                        "hist_sellers": torch.from_numpy(hs[e]),
                        "hour": torch.full((n,), -1, dtype=torch.long),
                        "dow": torch.full((n,), -1, dtype=torch.long),
                    }
                ).float().numpy()
            )
    return np.concatenate(out) if out else np.zeros((0, model.shape.dim), np.float32)


def _write_kind(tmp: Path, kind: str, ids: np.ndarray, idx: np.ndarray, vec: np.ndarray) -> None:
    d = vec.shape[1]
    flat = pa.array(np.ascontiguousarray(vec, dtype=np.float32).reshape(-1), pa.float32())
    vectors = pa.FixedSizeListArray.from_arrays(flat, d).cast(pa.list_(pa.float32())) if len(vec) else pa.array(
        [], pa.list_(pa.float32())
    )
    table = pa.table(
        {"id": pa.array(list(ids), pa.string()), "index": pa.array(idx, pa.int32()), "vector": vectors}
    )
    pq.write_table(table, tmp / f"{kind}.parquet", row_group_size=65536)
    save_npy(tmp / f"{kind}.npy", vec.astype(np.float32))
    save_npy(tmp / f"{kind}_idx.npy", idx.astype(np.int64))


def run(cfg: Config, run_dir: str | Path, prepared: str | Path | None = None) -> dict[str, Any]:
    """Embed all products, sellers and known users with the trained towers; write ``RUN_DIR/export``.

    Args:
        cfg: resolved configuration (``retrieval.export_batch_size``, ``data.max_history`` as fallback).
        run_dir: run directory with ``model/`` from ``recsys train``.
        prepared: prepared artifact (default: the one recorded in ``model/model.json``).

    Returns:
        The export manifest (counts, dim, model version, vocabulary fingerprint, path).

    Raises:
        ExportError: the model is missing or was trained on a different vocabulary.
    """
    t0 = time.time()
    run_dir = Path(run_dir)
    model_dir = serving_model_dir(run_dir)
    try:
        mman = read_manifest(model_dir, verify=True)
    except ArtifactError as e:
        raise ExportError(f"cannot export: {e} (run `recsys train` first)") from e
    model, desc = load_towers(model_dir)
    prepared = Path(prepared or desc.get("prepared", ""))
    try:
        pman = read_manifest(prepared)
    except ArtifactError as e:
        raise ExportError(f"cannot export: prepared artifact: {e}") from e
    vfp = vocab_fingerprint_from_files(pman.get("files", {}))
    if desc.get("vocab_fingerprint") and desc["vocab_fingerprint"] != vfp:
        raise ExportError(
            f"vocabulary fingerprint mismatch: model {model_dir} was trained with {desc['vocab_fingerprint']}, "
            f"prepared artifact {prepared} has {vfp}; export with the prepared artifact the model was trained on"
        )
    shape = model.shape
    batch = max(1, int(cfg.retrieval.export_batch_size))
    width = max_history(desc, cfg.data.max_history)
    counts: dict[str, int] = {}
    out_dir = run_dir / "export"
    mver = model_version(mman, desc)
    manifest: dict[str, Any] = {
        "stage": "export",
        "model_version": mver,
        "model_created_at": mman.get("created_at"),
        "config_fingerprint": desc.get("config_fingerprint"),
        "vocab_fingerprint": vfp,
        "prepared": str(prepared.resolve()),
        "dim": int(shape.dim),
        "normalisation": NORMALISATION,
        "metric": METRIC,
        "max_history": width,
        "popularity_prior": round(float(model.popularity_prior), 6),
    }
    with atomic_artifact(out_dir, manifest) as tmp:
        for kind, n_model, fn in (
            ("products", shape.n_products, model.product_vectors),
            ("sellers", shape.n_sellers, model.seller_vectors),
        ):
            ids, idx = read_vocab(prepared / "vocab" / f"{kind}.parquet")
            keep = (idx > 0) & (idx < n_model)
            if (~keep).any():
                raise ExportError(
                    f"vocab/{kind}.parquet has indexes outside the model's table (1..{n_model - 1}); "
                    "the model and the prepared artifact do not match"
                )
            vec = _item_vectors(fn, idx, batch) if len(idx) else np.zeros((0, shape.dim), np.float32)
            _write_kind(tmp, kind, ids, idx, vec)
            counts[kind] = len(idx)
            if kind == "products":
                with torch.no_grad():
                    off = model.product_offsets(torch.from_numpy(idx)).float().numpy()
                save_npy(tmp / "products_offsets.npy", off)
        ids, idx = read_vocab(prepared / "vocab" / "users.parquet")
        idx_model = np.where(idx < shape.n_users, idx, 0)
        hp, hs = history_matrix(prepared, idx, width)
        uvec = user_vectors(model, idx_model, hp, hs, batch)
        _write_kind(tmp, "users", ids, idx, uvec)
        counts["users"] = len(idx)
        norms = {k: float(np.abs(np.linalg.norm(np.load(tmp / f"{k}.npy"), axis=1) - 1).max(initial=0.0)) for k in counts}
        manifest["counts"] = counts
        manifest["max_norm_error"] = norms
        manifest["seconds"] = round(time.time() - t0, 2)
    out = read_manifest(out_dir)
    out["path"] = str(out_dir)
    return out
