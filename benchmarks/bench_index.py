"""FAISS index benchmark: recall@K against exact search and queries/s, single-query and batched, one core.

N unit vectors of dimension d (clustered by default, like tower embeddings; ``--random`` for
isotropic ones), queries drawn from the same distribution. For each index type:

* recall@K (an item tying the K-th exact score counts as found), build seconds;
* single-query throughput (one ``search`` call per query, the API pattern) and batched throughput
  (``--batch`` queries per call, the ``recommend`` pattern);
* ratio of single-query throughput to exact (``Flat``) single-query throughput.

Everything runs on ``--threads`` OpenMP threads (default 1: the per-core number). Examples::

    python benchmarks/bench_index.py                      # 1M x 64, takes a while (HNSW build)
    python benchmarks/bench_index.py --n 200000 --queries 500 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.faiss_index import SearchSettings, adapt_factory, build_index, exact_index, recall_from, search  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(n: int, d: int, nq: int, clustered: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if not clustered:
        return unit(rng.normal(size=(n, d)).astype(np.float32)), unit(rng.normal(size=(nq, d)).astype(np.float32))
    n_centers = max(16, int(math.sqrt(n)))
    centers = unit(rng.normal(size=(n_centers, d)).astype(np.float32))
    spread = 1.0

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, d), np.float32)
        for s in range(0, m, 262144):
            e = min(m, s + 262144)
            c = centers[rng.integers(0, n_centers, e - s)]
            out[s:e] = unit(c + spread * rng.normal(size=(e - s, d)).astype(np.float32) / math.sqrt(d))
        return out

    return draw(n), draw(nq)


def timed_single(index, xq: np.ndarray, k: int, s: SearchSettings, budget_s: float) -> tuple[float, np.ndarray]:
    """Queries/s issuing one query per call, for up to ``budget_s`` seconds (at least 20 queries)."""
    out = np.full((len(xq), k), -1, np.int64)
    t0 = time.perf_counter()
    n = 0
    for i in range(len(xq)):
        out[i] = search(index, xq[i : i + 1], k, s)[1][0]
        n += 1
        if n >= 20 and time.perf_counter() - t0 > budget_s:
            break
    return n / (time.perf_counter() - t0), out[:n]


def timed_batch(index, xq: np.ndarray, k: int, s: SearchSettings, batch: int) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    outs = [search(index, xq[i : i + batch], k, s)[1] for i in range(0, len(xq), batch)]
    return len(xq) / (time.perf_counter() - t0), np.concatenate(outs)


def _blas_threads(n: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(n, user_api="blas")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="catalog size")
    ap.add_argument("--d", type=int, default=64, help="dimension")
    ap.add_argument("--queries", type=int, default=1000, help="number of queries")
    ap.add_argument("--k", type=int, default=100, help="K of recall@K")
    ap.add_argument("--batch", type=int, default=1000, help="queries per call in the batched test")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads (1 = per-core numbers)")
    ap.add_argument("--build-threads", type=int, default=0, help="threads for building (0 = all cores)")
    ap.add_argument("--random", action="store_true", help="isotropic random vectors instead of clustered ones")
    ap.add_argument("--ef", default="100,128,256,512", help="HNSW efSearch sweep (FAISS raises efSearch to k)")
    ap.add_argument("--nprobe", default="8,16,32,64", help="IVF nprobe sweep")
    ap.add_argument("--ivf", default="IVF{nlist},PQ{m}x4fs,RFlat;IVF{nlist},PQ{m}x4fs;IVF{nlist},Flat",
                    help="';'-separated IVF factories ({nlist}, {m} filled in)")
    ap.add_argument("--single-budget-s", type=float, default=3.0, help="seconds per single-query measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    xb, xq = make_data(args.n, args.d, args.queries, not args.random, args.seed)
    k = min(args.k, args.n)
    faiss.omp_set_num_threads(args.build_threads or faiss.omp_get_max_threads())
    t0 = time.time()
    exact = exact_index(xb)
    De, _ = exact.search(xq, k)
    print(f"data: n={args.n} d={args.d} queries={len(xq)} k={k} clustered={not args.random} "
          f"(ground truth {time.time() - t0:.1f}s)", flush=True)
    faiss.omp_set_num_threads(args.threads)
    rows: list[dict] = []

    def bench(name: str, index, s: SearchSettings, build_s: float) -> None:
        faiss.omp_set_num_threads(args.threads)
        with _blas_threads(args.threads):  # FAISS's OpenBLAS has its own thread pool
            qps1, I1 = timed_single(index, xq, k, s, args.single_budget_s)
            qpsb, Ib = timed_batch(index, xq, k, s, args.batch)
        r = recall_from(Ib, xb, xq, De[:, k - 1 : k])
        row = {"index": name, "recall": round(r, 4), "single_qps": round(qps1, 1), "batch_qps": round(qpsb, 1),
               "build_s": round(build_s, 1), **{kk: v for kk, v in s.to_dict().items() if v}}
        rows.append(row)
        print(json.dumps(row), flush=True)

    bench("Flat", exact, SearchSettings(), 0.0)

    def build(factory: str):
        faiss.omp_set_num_threads(args.build_threads or faiss.omp_get_max_threads())
        t = time.time()
        ix = build_index(xb, factory)
        return ix, time.time() - t

    hnsw, bs = build("HNSW32")
    for ef in [int(x) for x in args.ef.split(",") if x]:
        bench(f"HNSW32 ef={ef}", hnsw, SearchSettings(ef_search=ef), bs)
    del hnsw
    nlist = 2 ** int(round(math.log2(4 * math.sqrt(args.n))))
    m = args.d // 2
    for tmpl in [t for t in args.ivf.split(";") if t]:
        factory = adapt_factory(tmpl.format(nlist=nlist, m=m), args.n)
        ix, bs = build(factory)
        for nprobe in [int(x) for x in args.nprobe.split(",") if x]:
            kf = 4.0 if "RFlat" in factory else 0.0
            bench(f"{factory} nprobe={nprobe}", ix, SearchSettings(nprobe=nprobe, k_factor=kf), bs)
        del ix
    flat1 = rows[0]["single_qps"]
    for r in rows:
        r["single_vs_exact"] = round(r["single_qps"] / flat1, 1)
    print()
    print(f"| index | recall@{k} | single q/s | x exact (single) | batched q/s | build s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['index']} | {r['recall']:.4f} | {r['single_qps']:.0f} | {r['single_vs_exact']:.1f} | "
              f"{r['batch_qps']:.0f} | {r['build_s']:.1f} |")
    out = {"n": args.n, "d": args.d, "k": k, "queries": len(xq), "threads": args.threads, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
