"""A tiny prepared artifact with a planted cluster structure, written with pyarrow (no Spark).

Users belong to one of ``n_clusters`` taste clusters and interact only with products (and sellers)
of their cluster, so a working two-tower model must rank the held-out products far above chance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.artifacts import write_manifest


def write_tiny_prepared(out: Path, n_users: int = 300, n_products: int = 120, n_sellers: int = 12, n_clusters: int = 6,
                        events_per_user: int = 12, seed: int = 0, max_history: int = 20) -> Path:
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "vocab").mkdir(parents=True, exist_ok=True)
    (out / "features").mkdir(parents=True, exist_ok=True)
    prod_cluster = np.arange(1, n_products + 1) % n_clusters
    sell_cluster = np.arange(1, n_sellers + 1) % n_clusters
    rows = {s: {k: [] for k in ("user_idx", "product_idx", "seller_idx", "weight", "event", "ts",
                                  "hist_products", "hist_sellers", "hour", "dow")} for s in ("train", "val", "test")}
    for u in range(1, n_users + 1):
        c = u % n_clusters
        prods = rng.choice(np.where(prod_cluster == c)[0] + 1, events_per_user, replace=False)
        sells = rng.choice(np.where(sell_cluster == c)[0] + 1, events_per_user)
        ts = np.sort(rng.integers(0, 1000, events_per_user)) + np.arange(events_per_user) * 1000
        for i in range(events_per_user):
            split = "train" if i < events_per_user - 2 else ("val" if i == events_per_user - 2 else "test")
            r = rows[split]
            r["user_idx"].append(u)
            r["product_idx"].append(int(prods[i]))
            r["seller_idx"].append(int(sells[i]))
            r["weight"].append(1.0)
            r["event"].append(2)
            r["ts"].append(int(ts[i]))
            r["hist_products"].append([int(x) for x in prods[max(0, i - max_history):i]])
            r["hist_sellers"].append([int(x) for x in sells[max(0, i - max_history):i]])
            r["hour"].append(int(i % 24))
            r["dow"].append(int(i % 7))
    schema = pa.schema([("user_idx", pa.int32()), ("product_idx", pa.int32()), ("seller_idx", pa.int32()),
                        ("weight", pa.float32()), ("event", pa.int8()), ("ts", pa.int64()),
                        ("hist_products", pa.list_(pa.int32())), ("hist_sellers", pa.list_(pa.int32())),
                        ("hour", pa.int8()), ("dow", pa.int8())])
    for split, r in rows.items():
        (out / "examples" / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(r, schema=schema), out / "examples" / split / "part-0.parquet", row_group_size=500)
    for name, n in (("users", n_users), ("products", n_products), ("sellers", n_sellers)):
        pq.write_table(pa.table({"id": [f"{name[0]}{i}" for i in range(1, n + 1)],
                                 "index": pa.array(range(1, n + 1), pa.int32()),
                                 "count": pa.array([1] * n, pa.int64())}), out / "vocab" / f"{name}.parquet")
    pq.write_table(pa.table({"product_idx": pa.array(range(n_products + 1), pa.int32()),
                             "cat_l1": pa.array([0] + [int(c) + 1 for c in prod_cluster], pa.int32()),
                             "log_price": pa.array(rng.normal(size=n_products + 1), pa.float32())}),
                   out / "features" / "products.parquet")
    pq.write_table(pa.table({"seller_idx": pa.array(range(n_sellers + 1), pa.int32()),
                             "rating": pa.array(rng.uniform(size=n_sellers + 1), pa.float32())}),
                   out / "features" / "sellers.parquet")
    write_manifest(out, {"stage": "prepare", "n_users": n_users + 1, "n_products": n_products + 1,
                         "n_sellers": n_sellers + 1, "n_categories": n_clusters + 1, "n_brands": 1,
                         "has_timestamps": True, "split": {"method": "leave_last_out"}})
    return out
