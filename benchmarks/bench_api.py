"""Load test of the retrieval API: Poisson arrivals at a fixed rate against a loopback server.

Starts ``retrieval.service`` (uvicorn, one process) on 127.0.0.1 with a bundle, sends
``POST /v1/retrieve/products`` (k=100 with filters: in stock, a price cap, sometimes a category and a
per-seller cap; 80% known users, 20% unknown) as an open-loop Poisson process at ``--rps`` for
``--duration`` seconds, and reports p50/p90/p99/max latency, throughput and errors. Latency is
measured from each request's *scheduled* time (no coordinated omission) and from its actual send.
Then the same queries run in-process (Retriever only, and the ASGI app without sockets) to show the
HTTP overhead.

Without ``--run``/``--bundle`` a synthetic marketplace is built first (untrained towers; the
retrieval cost does not depend on the weights)::

    python benchmarks/bench_api.py                          # 30 s at 300 rps, synthetic 20k products
    python benchmarks/bench_api.py --duration 600 --rps 300 --bundle runs/x/bundles/CURRENT_DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from loadgen import cpu_seconds, pct, poisson_load  # noqa: E402


def build_synthetic(tmp: Path, n_users: int, n_products: int, n_sellers: int, dim: int) -> Path:
    from recsys.config import load_config
    from retrieval import bundle as bundle_mod
    from tests.test_retrieval_support import make_run

    cfg = load_config(None, ["data.max_history=20"])
    t0 = time.time()
    _, run = make_run(tmp, cfg, n_users=n_users, n_products=n_products, n_sellers=n_sellers, n_clusters=20, dim=dim)
    path = bundle_mod.run(cfg, run)["path"]
    print(f"synthetic bundle: {n_users} users, {n_products} products, {n_sellers} sellers, d={dim} "
          f"({time.time() - t0:.0f}s) at {path}", flush=True)
    return Path(path)


def serve_main(bundle: str, port: int, threads: int) -> None:
    import uvicorn

    from recsys.config import load_config
    from retrieval.service import create_app

    app = create_app(bundle, load_config(None), threads=threads)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def make_queries(bundle_path: Path, n: int, k: int, seed: int) -> list[dict]:
    import pyarrow.parquet as pq

    users = np.asarray(pq.read_table(bundle_path / "export" / "users_ids.parquet")["id"].to_pylist(), dtype=object)
    cats = []
    cpath = bundle_path / "vocab" / "categories.parquet"
    if cpath.exists():
        cats = np.asarray(pq.read_table(cpath)["id"].to_pylist(), dtype=object)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        known = rng.random() < 0.8
        f: dict = {"in_stock": True, "max_price": float(rng.choice([50.0, 80.0, 120.0]))}
        if len(cats) and rng.random() < 0.3:
            f["categories"] = [str(cats[rng.integers(len(cats))])]
        if rng.random() < 0.3:
            f["max_per_seller"] = 3
        out.append({"user_id": str(users[rng.integers(len(users))]) if known else f"anon-{i}", "k": k, "filters": f})
    return out


async def load(url: str, queries: list[dict], rps: float, duration: float, seed: int, connections: int = 64) -> dict:
    """Open-loop Poisson load of ``POST /v1/retrieve/products`` (``loadgen.poisson_load``)."""
    bodies = [json.dumps(q).encode() for q in queries]
    return await poisson_load(url, "/v1/retrieve/products", bodies, rps, duration, seed, connections)


async def _asgi_call(app, body: bytes) -> int:
    """One POST /v1/retrieve/products straight into the ASGI app (no socket, no HTTP parsing)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/retrieve/products", "raw_path": b"/v1/retrieve/products", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    done = False
    status = [0]

    async def receive():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            status[0] = message["status"]

    await app(scope, receive, send)
    return status[0]


def in_process(bundle_path: Path, queries: list[dict], n: int, threads: int) -> dict:
    """The same queries without HTTP: the Retriever alone, and the ASGI app called directly."""
    from recsys.config import load_config
    from retrieval.retriever import Filters
    from retrieval.service import create_app

    cfg = load_config(None)
    app = create_app(bundle_path, cfg, threads=threads)  # also caps FAISS / torch / BLAS threads
    r = app.state.service.live.retriever
    lib = []
    for q in queries[:n]:
        f = q["filters"]
        flt = Filters(in_stock=f["in_stock"], max_price=f["max_price"], categories=tuple(f.get("categories", ())),
                      max_per_seller=f.get("max_per_seller", 0))
        t = time.perf_counter()
        r.recommend_products([q["user_id"]], q["k"], flt)
        lib.append(time.perf_counter() - t)

    async def run_asgi() -> list[float]:
        out = []
        for q in queries[:n]:
            body = json.dumps(q).encode()
            t = time.perf_counter()
            status = await _asgi_call(app, body)
            out.append(time.perf_counter() - t)
            assert status == 200, status
        return out

    asgi = asyncio.run(run_asgi())
    return {"library": pct(np.array(lib)), "asgi_no_socket": pct(np.array(asgi))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="bundle directory (or bundles dir / run dir with bundles/CURRENT)")
    ap.add_argument("--run", help="run directory (its bundles/CURRENT, built if missing)")
    ap.add_argument("--rps", type=float, default=300.0)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load (e.g. 600 for the long test)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--port", type=int, default=0, help="0 = a free port")
    ap.add_argument("--threads", type=int, default=1, help="FAISS/torch threads in the server")
    ap.add_argument("--users", type=int, default=20000, help="synthetic users")
    ap.add_argument("--products", type=int, default=20000, help="synthetic products")
    ap.add_argument("--sellers", type=int, default=500, help="synthetic sellers")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--in-process", type=int, default=2000, help="queries for the in-process comparison (0 = skip)")
    ap.add_argument("--workdir", help="build the synthetic bundle here and reuse it on later runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve_main(args.bundle, args.port, args.threads)
        return {}

    from retrieval.bundle import resolve_bundle_path

    tmp = None
    if args.bundle:
        bundle_path = resolve_bundle_path(args.bundle)
    elif args.run:
        from recsys.config import load_config
        from retrieval.bundle import ensure_bundle

        bundle_path = ensure_bundle(load_config(None), args.run)
    elif args.workdir and (Path(args.workdir) / "run" / "bundles" / "CURRENT").exists():
        bundle_path = resolve_bundle_path(Path(args.workdir) / "run")
    else:
        if args.workdir:
            work = Path(args.workdir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="bench_api_")
            work = Path(tmp.name)
        bundle_path = build_synthetic(work, args.users, args.products, args.sellers, args.dim)
    port = args.port
    if not port:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--bundle", str(bundle_path), "--port", str(port),
         "--threads", str(args.threads)], cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        import httpx

        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.2)
        queries = make_queries(bundle_path, 5000, args.k, args.seed)
        # warm-up (filter caches, connections)
        asyncio.run(load(url, queries, min(args.rps, 100.0), 2.0, args.seed + 1))
        cpu0 = cpu_seconds(server.pid)
        res = asyncio.run(load(url, queries, args.rps, args.duration, args.seed))
        cpu1 = cpu_seconds(server.pid)
    finally:
        server.terminate()
        server.wait(10)
    out = {
        "bundle": str(bundle_path),
        "rps_target": args.rps,
        "duration_s": args.duration,
        "k": args.k,
        "requests": res["requests"],
        "throughput_rps": round(res["requests"] / res["wall_s"], 1),
        "errors": len(res["errors"]),
        "error_kinds": sorted({str(e) for e in res["errors"]}),
        "latency_from_schedule": pct(res["sched"]),
        "latency_from_send": pct(res["send"]),
        "server_cpu_ms_per_request": round(1000 * (cpu1 - cpu0) / max(res["requests"], 1), 2) if cpu0 is not None else None,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if args.in_process:
        out["in_process"] = in_process(bundle_path, queries, args.in_process, args.threads)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return out


if __name__ == "__main__":
    main()
