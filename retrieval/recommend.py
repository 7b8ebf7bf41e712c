"""``recsys recommend``: batch top-K products (or sellers) for a file of users, through the Retriever.

Input ``users_file``: one user id per line without a header (``.txt`` or anything else), or a CSV /
Parquet file with a ``user_id`` column. Output Parquet, one row per (user, item):

* products: user_id, product_id, rank (1-based), score, seller_id (best offer), fallback
* sellers:  user_id, seller_id, rank, score, fallback

Users are processed in batches (``BATCH_USERS``) with one FAISS call per batch; already-bought
products are excluded (``data.bought_events``). Unknown users get the popular list, ``fallback`` true.
The output is written to a temporary file and renamed into place.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recsys.config import Config
from retrieval.bundle import ensure_bundle, load_bundle
from retrieval.common import RetrievalError
from retrieval.retriever import Filters, Retriever

BATCH_USERS = 4096

PRODUCT_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("product_id", pa.string()), ("rank", pa.int32()), ("score", pa.float32()),
     ("seller_id", pa.string()), ("fallback", pa.bool_())]
)
SELLER_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("seller_id", pa.string()), ("rank", pa.int32()), ("score", pa.float32()),
     ("fallback", pa.bool_())]
)


def read_users(path: str | Path) -> list[str]:
    """User ids from a text file (one per line), or a CSV / Parquet file with a ``user_id`` column."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"users file {p} not found")
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq") or p.is_dir():
        t = pq.read_table(p)
    elif suffix == ".csv":
        t = pacsv.read_csv(p, convert_options=pacsv.ConvertOptions(column_types={"user_id": pa.string()}))
    else:
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if "user_id" not in t.column_names:
        raise RetrievalError(f"{p}: no 'user_id' column (columns: {', '.join(t.column_names)})")
    return [str(u) for u in t["user_id"].cast(pa.string()).to_pylist() if u is not None and str(u) != ""]


def run(
    cfg: Config,
    run_dir: str | Path,
    users_file: str | Path,
    k: int,
    out_file: str | Path,
    what: str = "products",
    filters: Filters | None = None,
    bundle_path: str | Path | None = None,
) -> dict[str, Any]:
    """Write top-``k`` recommendations for every user of ``users_file`` to ``out_file`` (Parquet).

    Args:
        cfg: resolved configuration (retrieval section, data.bought_events).
        run_dir: run directory; its ``bundles/CURRENT`` is used, built first (export, index, bundle) if missing.
        users_file: see the module docstring.
        k: list length (>= 1).
        out_file: output Parquet path.
        what: "products" or "sellers".
        filters: product filters (default: exclude already-bought items only).
        bundle_path: use this bundle instead of the run's current one.

    Returns:
        Summary: users, known, fallback users, rows, seconds, users/s, bundle version, output path.
    """
    if what not in ("products", "sellers"):
        raise ValueError(f"--what must be 'products' or 'sellers', got {what!r}")
    if int(k) < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    t0 = time.time()
    path = Path(bundle_path) if bundle_path else ensure_bundle(cfg, run_dir)
    bundle = load_bundle(path)
    retriever = Retriever(bundle, cfg)
    users = read_users(users_file)
    filters = filters or Filters()
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    schema = PRODUCT_SCHEMA if what == "products" else SELLER_SCHEMA
    n_rows = n_fallback = 0
    t_load = time.time() - t0
    try:
        with pq.ParquetWriter(tmp, schema) as w:
            for s in range(0, len(users), BATCH_USERS):
                batch = users[s : s + BATCH_USERS]
                table, fb = (_products(retriever, batch, k, filters) if what == "products"
                             else _sellers(retriever, batch, k))
                n_rows += table.num_rows
                n_fallback += fb
                if table.num_rows:
                    w.write_table(table, row_group_size=1 << 20)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    secs = time.time() - t0
    return {
        "users": len(users),
        "known_users": len(users) - n_fallback,
        "fallback_users": n_fallback,
        "rows": n_rows,
        "what": what,
        "k": int(k),
        "bundle_version": bundle.version,
        "bundle": str(path),
        "load_seconds": round(t_load, 2),
        "seconds": round(secs, 2),
        "users_per_second": round(len(users) / max(secs - t_load, 1e-9), 1),
        "out": str(out),
    }


def _products(r: Retriever, users: list[str], k: int, filters: Filters) -> tuple[pa.Table, int]:
    t = r.topk_products(users, k, filters)
    ok = t.positions >= 0
    row, col = np.nonzero(ok)
    pos = t.positions[row, col]
    seller_ids = r.seller_ids_of_idx(t.seller_idx[row, col])
    table = pa.table(
        {
            "user_id": pa.array(np.asarray(users, dtype=object)[row], pa.string()),
            "product_id": pa.array(r.product_ids_at(pos), pa.string()),
            "rank": pa.array((col + 1).astype(np.int32)),
            "score": pa.array(t.scores[row, col].astype(np.float32)),
            "seller_id": pa.array(seller_ids, pa.string()),
            "fallback": pa.array(t.fallback[row]),
        },
        schema=PRODUCT_SCHEMA,
    )
    return table, int(t.fallback.sum())


def _sellers(r: Retriever, users: list[str], k: int) -> tuple[pa.Table, int]:
    pos, sc, fb = r.topk_sellers(users, k)
    row, col = np.nonzero(pos >= 0)
    table = pa.table(
        {
            "user_id": pa.array(np.asarray(users, dtype=object)[row], pa.string()),
            "seller_id": pa.array(r.seller_ids_at(pos[row, col]), pa.string()),
            "rank": pa.array((col + 1).astype(np.int32)),
            "score": pa.array(sc[row, col].astype(np.float32)),
            "fallback": pa.array(fb[row]),
        },
        schema=SELLER_SCHEMA,
    )
    return table, int(fb.sum())
