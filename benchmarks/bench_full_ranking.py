"""Full-catalog evaluation at scale: exact top-K over 1M products with per-user exclusions.

    python benchmarks/bench_full_ranking.py                               # 1M products, 5,000 users
    python benchmarks/bench_full_ranking.py --products 200000 --users 20000
    python benchmarks/bench_full_ranking.py --device cuda

Times :func:`towers.full_ranking.topk_excluding` (what ``recsys evaluate``, validation during
training and the popularity-prior choice run) on random unit vectors with a popularity offset,
reports users/s, the users per matrix product and the peak resident memory, and checks the first
users' lists against a brute-force numpy ranking (so a fast wrong answer cannot pass).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
import torch

from towers import full_ranking
from towers.full_ranking import topk_excluding, users_per_batch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--products", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=5_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=100, help="list length (the largest eval.ks)")
    ap.add_argument("--exclude", type=int, default=20, help="excluded (already bought) products per user")
    ap.add_argument("--batch-users", type=int, default=1024, help="eval.batch_users")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--check-users", type=int, default=5)
    ap.add_argument("--max-score-gib", type=float, default=None, help="override full_ranking.MAX_SCORE_BYTES")
    a = ap.parse_args(argv)
    if a.max_score_gib is not None:
        full_ranking.MAX_SCORE_BYTES = int(a.max_score_gib * 2**30)
    torch.set_num_threads(a.threads)
    g = np.random.default_rng(0)
    dev = torch.device(a.device)
    items = torch.nn.functional.normalize(torch.from_numpy(g.normal(size=(a.products, a.dim)).astype(np.float32)), dim=1)
    users = torch.nn.functional.normalize(torch.from_numpy(g.normal(size=(a.users, a.dim)).astype(np.float32)), dim=1)
    bias = torch.from_numpy((0.1 * np.log(g.zipf(1.3, a.products).clip(1, 10**6) / 10**6)).astype(np.float32))
    excl = g.integers(1, a.products, size=(a.users, a.exclude)).astype(np.int64)
    csr = (np.arange(a.users + 1, dtype=np.int64) * a.exclude, excl.reshape(-1))
    items_d, users_d, bias_d = items.to(dev), users.to(dev), bias.to(dev)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    top, _ = topk_excluding(users_d, items_d, csr, a.k, a.batch_users, bias_d)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # brute force for the first users, in float64
    n = min(a.check_users, a.users)
    s = users[:n].double().numpy() @ items.double().numpy().T + bias.double().numpy()
    s[:, 0] = -np.inf
    for r in range(n):
        s[r, excl[r]] = -np.inf
    want = np.argsort(-s, axis=1)[:, : a.k]
    agree = float(np.mean([len(set(top[r]) & set(want[r])) / a.k for r in range(n)]))
    out = {
        "products": a.products, "users": a.users, "dim": a.dim, "k": a.k, "threads": a.threads, "device": a.device,
        "users_per_matrix_product": users_per_batch(a.batch_users, a.products, items_d.element_size()),
        "max_score_bytes": full_ranking.MAX_SCORE_BYTES, "seconds": round(seconds, 2), "users_per_s": round(a.users / seconds, 1),
        "peak_rss_gib": round(rss / 2**20, 2), "peak_rss_growth_gib": round((rss - rss0) / 2**20, 2),
        "brute_force_overlap": agree,
    }
    print(json.dumps(out, indent=1))
    return 0 if agree > 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
