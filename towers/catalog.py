"""Catalog tensors for the towers, read from the prepared artifact's features and vocabularies."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from data_pipelines.schema import PRODUCT_CATEGORICALS, PRODUCT_FEATURES, SELLER_FEATURES


@dataclass(frozen=True)
class Catalog:
    """Table sizes and per-row feature tensors (row i = index i; row 0 unknown).

    Attributes:
        product_cats: [N, 4] int64 (category levels 1-3, brand).
        product_num: [N, F] float32.
        seller_num: [S, G] float32.
        product_logq: [N] float32 log frequency of each product among training positives.
        seller_logq: [S] float32 log frequency of each seller among training positives.
    """

    n_users: int
    n_products: int
    n_sellers: int
    n_categories: int
    n_brands: int
    product_cats: torch.Tensor
    product_num: torch.Tensor
    seller_num: torch.Tensor
    product_logq: torch.Tensor
    seller_logq: torch.Tensor


def _rows(path: Path, idx_col: str, cols: tuple[str, ...], n: int, dtype) -> np.ndarray:
    out = np.zeros((n, len(cols)), dtype=dtype)
    if not path.exists():
        return out
    t = pq.read_table(path)
    present = [c for c in cols if c in t.column_names]
    if not present:
        return out
    idx = np.asarray(t[idx_col], dtype=np.int64)
    ok = (idx >= 0) & (idx < n)
    for j, c in enumerate(cols):
        if c in t.column_names:
            v = np.asarray(t[c].fill_null(0), dtype=np.float64)
            out[idx[ok], j] = np.nan_to_num(v[ok]).astype(dtype)
    return out


def _logq(counts: np.ndarray) -> np.ndarray:
    total = max(float(counts.sum()), 1.0)
    # A floor keeps never-seen items finite: they are as rare as half an observation.
    return np.log(np.maximum(counts, 0.5) / total).astype(np.float32)


def load_catalog(prepared: str | Path) -> Catalog:
    """Read sizes, features and sampling frequencies from a prepared artifact directory."""
    prepared = Path(prepared)
    m = json.loads((prepared / "manifest.json").read_text())
    n_users, n_products, n_sellers = int(m["n_users"]), int(m["n_products"]), int(m["n_sellers"])
    n_cat, n_brand = int(m.get("n_categories", 1)), int(m.get("n_brands", 1))
    f = prepared / "features"
    cats = _rows(f / "products.parquet", "product_idx", PRODUCT_CATEGORICALS, n_products, np.int64)
    pnum = _rows(f / "products.parquet", "product_idx", PRODUCT_FEATURES, n_products, np.float32)
    snum = _rows(f / "sellers.parquet", "seller_idx", SELLER_FEATURES, n_sellers, np.float32)
    cats[:, :3] = np.clip(cats[:, :3], 0, max(n_cat - 1, 0))
    cats[:, 3] = np.clip(cats[:, 3], 0, max(n_brand - 1, 0))
    # Train positives give the frequencies: the same numbers the pipeline stores in product_freq.
    t = pq.read_table(prepared / "examples" / "train", columns=["product_idx", "seller_idx", "weight"]) if (
        prepared / "examples" / "train"
    ).exists() else None
    if t is not None and t.num_rows:
        w = np.asarray(t["weight"], dtype=np.float64)
        pc = np.bincount(np.asarray(t["product_idx"], dtype=np.int64), weights=w, minlength=n_products)[:n_products]
        sc = np.bincount(np.asarray(t["seller_idx"], dtype=np.int64), weights=w, minlength=n_sellers)[:n_sellers]
        sc[0] = 0
    else:
        pc = np.zeros(n_products)
        sc = np.zeros(n_sellers)
    return Catalog(
        n_users=n_users,
        n_products=n_products,
        n_sellers=n_sellers,
        n_categories=n_cat,
        n_brands=n_brand,
        product_cats=torch.from_numpy(cats),
        product_num=torch.from_numpy(pnum),
        seller_num=torch.from_numpy(snum),
        product_logq=torch.from_numpy(_logq(pc)),
        seller_logq=torch.from_numpy(_logq(sc)),
    )
