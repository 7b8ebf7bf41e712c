"""Throughput of the example loaders: Parquet → dicts of torch tensors, rows per second.

    python benchmarks/bench_loaders.py                        # fabricate 1,000,000 rows
    python benchmarks/bench_loaders.py --rows 200000          # smaller
    python benchmarks/bench_loaders.py --examples prepared/examples/train --max-history 50

Fabricated rows follow ``schema.EXAMPLE_COLUMNS`` with histories of 20–50 items (list<int32>), written
as ``--files`` part files with ``--row-group`` rows per row group. Each configuration runs one full
shuffled epoch (after a warm-up epoch on the first configuration, so the page cache is warm) and
reports rows/s and batches/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.loaders import make_loader  # noqa: E402


def fabricate(
    out_dir: str,
    rows: int,
    files: int = 8,
    row_group: int = 65536,
    hist_min: int = 20,
    hist_max: int = 50,
    n_products: int = 200_000,
    seed: int = 0,
) -> str:
    """Write ``rows`` synthetic example rows as ``files`` Parquet part files; returns the directory."""
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    per = -(-rows // files)
    for f in range(files):
        n = min(per, rows - f * per)
        if n <= 0:
            break
        lens = rng.integers(hist_min, hist_max + 1, n)
        offs = np.zeros(n + 1, np.int32)
        np.cumsum(lens, out=offs[1:])
        prods = rng.integers(1, n_products, offs[-1], dtype=np.int32)
        table = pa.table(
            {
                "user_idx": pa.array(rng.integers(1, rows // 5 + 2, n, dtype=np.int32)),
                "product_idx": pa.array(rng.integers(1, n_products, n, dtype=np.int32)),
                "seller_idx": pa.array(rng.integers(0, 5000, n, dtype=np.int32)),
                "weight": pa.array(rng.random(n, dtype=np.float32)),
                "event": pa.array(rng.integers(0, 3, n, dtype=np.int8)),
                "ts": pa.array(rng.integers(1.5e9, 1.6e9, n, dtype=np.int64)),
                "hist_products": pa.ListArray.from_arrays(pa.array(offs), pa.array(prods)),
                "hist_sellers": pa.ListArray.from_arrays(pa.array(offs), pa.array(prods % 5000)),
                "hour": pa.array(rng.integers(0, 24, n, dtype=np.int8)),
                "dow": pa.array(rng.integers(0, 7, n, dtype=np.int8)),
            }
        )
        pq.write_table(table, os.path.join(out_dir, f"part-{f:05d}.parquet"), row_group_size=row_group)
    return out_dir


def run_one(
    kind: str, path: str, batch_size: int, workers: int, max_history: int
) -> tuple[float, int, float]:
    loader = make_loader(
        kind, path, batch_size=batch_size, max_history=max_history, shuffle=True, seed=0, num_workers=workers
    )
    t0 = time.perf_counter()
    rows = batches = 0
    check = 0
    for b in loader:
        rows += b["user_idx"].shape[0]
        batches += 1
        check += int(b["hist_len"][0])  # touch the data
    dt = time.perf_counter() - t0
    return rows / dt, rows, dt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", help="existing examples directory (else fabricate)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--row-group", type=int, default=65536)
    ap.add_argument("--max-history", type=int, default=50)
    ap.add_argument("--batch-sizes", default="1024,4096")
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--kinds", default="arrow,petastorm")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_loaders_") as tmp:
        path = args.examples
        if not path:
            t = time.perf_counter()
            path = fabricate(tmp, args.rows, args.files, args.row_group)
            print(f"fabricated {args.rows:,} rows in {time.perf_counter() - t:.1f}s at {path}")
        total = sum(pq.ParquetFile(f).metadata.num_rows for f in Path(path).rglob("*.parquet"))
        print(f"examples: {total:,} rows, max_history={args.max_history}, cpus={os.cpu_count()}")
        kinds = args.kinds.split(",")
        run_one(kinds[0], path, 4096, 0, args.max_history)  # warm the page cache
        print(f"{'loader':<10} {'batch':>6} {'workers':>7} {'rows/s':>12} {'batches/s':>10} {'seconds':>8}")
        for kind in kinds:
            for bs in map(int, args.batch_sizes.split(",")):
                for w in map(int, args.workers.split(",")):
                    rps, rows, dt = run_one(kind, path, bs, w, args.max_history)
                    print(f"{kind:<10} {bs:>6} {w:>7} {rps:>12,.0f} {rps / bs:>10.1f} {dt:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
