"""Shared builders for the retrieval tests: a tiny prepared artifact with marketplace extras and a run dir.

``make_run`` writes the tiny artifact of ``tests.tiny_prepared`` plus what it lacks (offers, category
vocabulary, a second category level, raw prices, full histories with view and purchase events),
and an untrained two-tower model saved like ``recsys train`` does (no Lightning, no training).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.artifacts import atomic_artifact, write_manifest
from recsys.config import Config, fingerprint, load_config, to_dict
from retrieval.common import vocab_fingerprint_from_files
from tests.tiny_prepared import write_tiny_prepared
from towers.checkpoint import save_towers
from towers.shapes import TowerShape
from towers.two_tower import TwoTowerModel

N_USERS, N_PRODUCTS, N_SELLERS, N_CLUSTERS = 300, 120, 12, 6


def tiny_cfg(*overrides: str) -> Config:
    return load_config(None, ["retrieval.recall_sample_queries=200", "data.max_history=20", *overrides])


def extend_prepared(prep: Path, seed: int = 0, n_products: int = N_PRODUCTS, n_sellers: int = N_SELLERS,
                    n_clusters: int = N_CLUSTERS) -> None:
    """Add offers, categories, raw prices and full histories to a tiny prepared artifact."""
    rng = np.random.default_rng(seed)
    f = prep / "features"
    n = n_products + 1
    pidx = np.arange(n, dtype=np.int32)
    cat1 = np.where(pidx > 0, pidx % n_clusters + 1, 0).astype(np.int32)
    sub = np.where(pidx > 0, (pidx // n_clusters) % 2, 0)
    cat2 = np.where(pidx > 0, n_clusters + 1 + (cat1 - 1) * 2 + sub, 0).astype(np.int32)
    price = np.where(pidx > 0, 10.0 + (pidx % 17) * 5.0, -1.0).astype(np.float32)
    old = pq.read_table(f / "products.parquet")
    pq.write_table(
        pa.table({"product_idx": pidx, "cat_l1": cat1, "cat_l2": cat2, "cat_l3": np.zeros(n, np.int32),
                  "log_price": old["log_price"], "raw_price": price}),
        f / "products.parquet",
    )
    cat_ids = [f"dept{c}" for c in range(1, n_clusters + 1)]
    cat_ids += [f"dept{c} > sub{s}" for c in range(1, n_clusters + 1) for s in range(2)]
    pq.write_table(pa.table({"id": cat_ids, "index": pa.array(range(1, len(cat_ids) + 1), pa.int32()),
                             "count": pa.array([1] * len(cat_ids), pa.int64())}), prep / "vocab" / "categories.parquet")
    n_off = rng.integers(1, 4, size=n - 1)
    o_prod = np.repeat(np.arange(1, n), n_off)
    o_sell = rng.integers(1, n_sellers + 1, len(o_prod))
    _, first = np.unique(o_prod.astype(np.int64) * (n_sellers + 1) + o_sell, return_index=True)
    o_prod, o_sell = o_prod[np.sort(first)], o_sell[np.sort(first)]  # one offer per (product, seller)
    pq.write_table(pa.table({"product_idx": pa.array(o_prod, pa.int32()),
                             "seller_idx": pa.array(o_sell, pa.int32()),
                             "price": pa.array(price[o_prod] * rng.uniform(0.8, 1.2, len(o_prod)), pa.float32()),
                             "stock": pa.array(rng.choice([0, -1, 3, 10], len(o_prod)), pa.int32()),
                             "shipping_days": pa.array(rng.integers(1, 6, len(o_prod)), pa.int32())}),
                   f / "offers.parquet")
    ex = pq.read_table(prep / "examples", columns=["user_idx", "product_idx", "seller_idx", "ts"]).to_pandas()
    ex = ex.sort_values(["user_idx", "ts"])
    hist = {"user_idx": [], "products": [], "sellers": [], "types": []}
    for u, g in ex.groupby("user_idx"):
        t = [2 if i % 2 == 0 else 0 for i in range(len(g))]  # alternate purchases and views
        hist["user_idx"].append(int(u))
        hist["products"].append([int(x) for x in g["product_idx"]])
        hist["sellers"].append([int(x) for x in g["seller_idx"]])
        hist["types"].append(t)
    (prep / "histories").mkdir(exist_ok=True)
    pq.write_table(pa.table({"user_idx": pa.array(hist["user_idx"], pa.int32()),
                             "products": pa.array(hist["products"], pa.list_(pa.int32())),
                             "sellers": pa.array(hist["sellers"], pa.list_(pa.int32())),
                             "types": pa.array(hist["types"], pa.list_(pa.int8()))}), prep / "histories" / "full.parquet")
    m = json.loads((prep / "manifest.json").read_text())
    m.pop("files", None)
    m["n_categories"] = len(cat_ids) + 1
    write_manifest(prep, m)


def save_model(run: Path, prep: Path, cfg: Config, dim: int = 16, seed: int = 0) -> None:
    """An untrained two-tower model saved as ``RUN_DIR/model`` (what ``recsys train`` writes)."""
    torch.manual_seed(seed)
    pm = json.loads((prep / "manifest.json").read_text())
    shape = TowerShape(n_users=int(pm["n_users"]), n_products=int(pm["n_products"]), n_sellers=int(pm["n_sellers"]),
                       n_categories=int(pm["n_categories"]), n_brands=1, n_product_features=0, n_seller_features=0,
                       dim=dim, hidden=32, sparse=False)
    model = TwoTowerModel(shape).eval()
    resolved = to_dict(cfg)
    extra = {"config": resolved, "config_fingerprint": fingerprint(resolved),
             "vocab_fingerprint": vocab_fingerprint_from_files(pm["files"]), "prepared": str(prep.resolve())}
    with atomic_artifact(run / "model", {"stage": "train", **extra}) as tmp:
        save_towers(model, tmp, extra)


def make_run(tmp: Path, cfg: Config | None = None, seed: int = 0, n_users: int = N_USERS,
             n_products: int = N_PRODUCTS, n_sellers: int = N_SELLERS, n_clusters: int = N_CLUSTERS,
             dim: int = 16) -> tuple[Path, Path]:
    """(prepared dir, run dir with model/) under ``tmp`` (also used by benchmarks/bench_api.py)."""
    cfg = cfg or tiny_cfg()
    prep = write_tiny_prepared(tmp / "prep", n_users=n_users, n_products=n_products, n_sellers=n_sellers,
                               n_clusters=n_clusters, seed=seed)
    extend_prepared(prep, seed, n_products, n_sellers, n_clusters)
    run = tmp / "run"
    save_model(run, prep, cfg, dim=dim, seed=seed)
    return prep, run


def test_serving_modules_do_not_import_lightning() -> None:
    """The serving path (every retrieval module) must never pull in PyTorch Lightning."""
    import subprocess

    code = (
        "import sys\n"
        "import retrieval.common, retrieval.export, retrieval.faiss_index, retrieval.bundle, retrieval.marketplace\n"
        "import retrieval.retriever, retrieval.recommend, retrieval.service, retrieval.client, towers.checkpoint\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning'))\n"
        "print(','.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"lightning imported by retrieval: {r.stdout} {r.stderr[-2000:]}"
