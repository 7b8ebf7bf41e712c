"""Ranking latency: in-process (100 candidates, one forward) and end to end through both services.

    python benchmarks/bench_ranking.py --run RUN_DIR                       # 10 s at 100 requests/s
    python benchmarks/bench_ranking.py --run RUN_DIR --duration 60 --rate 200 --out bench.json
    python benchmarks/bench_ranking.py --run RUN_DIR --no-e2e              # in-process only

RUN_DIR needs ``ranker/`` and a retrieval bundle (``bundles/CURRENT``; ``recsys fit`` makes both).

In-process: ``Ranker.rank`` for ``--candidates`` retrieved candidates of random known users, with
the sellers retrieval chose (``/v1/rank``) and with every offer expanded (what ``/v1/recommend``
does), one torch thread. End to end: the retrieval service and the ranking service run as two
uvicorn processes on loopback; an open-loop generator sends ``POST /v1/recommend`` with Poisson
arrivals at ``--rate`` per second for ``--duration`` seconds. Latency is measured from each request's
scheduled arrival time (queueing included, no coordinated omission). Goal on 2 cores: p99 < 40 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from loadgen import cpu_seconds, pct, poisson_load  # noqa: E402


def percentiles(ms: list[float] | np.ndarray) -> dict[str, float]:
    """Count, mean and :func:`loadgen.pct` of in-process times given in ms."""
    a = np.asarray(ms, np.float64)
    if len(a) == 0:
        return {"n": 0}
    return {"n": int(len(a)), "mean_ms": round(float(a.mean()), 3), **pct(a / 1000, digits=3)}


def in_process(cfg, run: Path, n: int, n_cand: int, seed: int) -> dict[str, Any]:
    import torch

    from ranking.scorer import Ranker
    from retrieval.bundle import load_bundle
    from retrieval.retriever import Retriever

    torch.set_num_threads(1)
    ranker = Ranker.load(run / "ranker", run)
    retriever = Retriever(load_bundle(run), cfg)
    rng = np.random.default_rng(seed)
    ids = retriever.bundle.user_ids
    users = [str(u) for u in rng.choice(ids, min(n, 200, len(ids)), replace=False)]
    lists = {u: retriever.recommend_products([u], n_cand)[0].candidates for u in users}
    ctx = {"hour": 20, "dow": 4}
    out: dict[str, Any] = {"candidates": n_cand, "users": len(users)}
    for name, expand in (("given_sellers", False), ("expand_offers", True)):
        for u in users[:20]:  # warm-up (and fill the per-user cache the way a live server would)
            ranker.rank(u, lists[u], ctx, expand)
        ms, rows = [], []
        for i in range(n):
            u = users[i % len(users)]
            t0 = time.perf_counter()
            ranker.rank(u, lists[u], ctx, expand)
            ms.append(1000 * (time.perf_counter() - t0))
        out[name] = percentiles(ms)
        # the per-user cache makes repeated users cheaper: time cold users too
        ranker._user_cache.clear()
        cold = []
        for u in users:
            t0 = time.perf_counter()
            ranker.rank(u, lists[u], ctx, expand)
            cold.append(1000 * (time.perf_counter() - t0))
            ranker._user_cache.clear()
        out[f"{name}_uncached_user"] = percentiles(cold)
        if expand:
            rows = [sum(1 for _ in ranker.offers.seller_idx[ranker.offers.rows_of_product(p)]) or 1
                    for p in ranker.product_indexes([c.product_id for c in lists[users[0]]])]
            out["expanded_rows_per_request"] = int(np.sum(rows))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVER = """
import json, sys
sys.path.insert(0, {root!r})
from recsys.config import from_dict
cfg = from_dict(json.load(open({cfg!r})))
if {kind!r} == "retrieval":
    from retrieval.service import serve
    serve(cfg, run_dir={run!r}, host="127.0.0.1", port={port})
else:
    from ranking.service import serve
    serve(cfg, {run!r}, {url!r}, host="127.0.0.1", port={port})
"""


def start(kind: str, cfg_path: str, run: Path, port: int, url: str = "") -> subprocess.Popen:
    code = SERVER.format(root=str(ROOT), cfg=cfg_path, kind=kind, run=str(run), port=port, url=url)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited: {proc.stderr.read().decode()[-3000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def _fallback(body: bytes) -> str | None:
    """The response's fallback tag (ranker timeout / error -> retrieval order), None when ranked."""
    return None if b'"fallback":null' in body else "fallback"


def end_to_end(cfg, run: Path, rate: float, duration: float, k: int, n_cand: int, seed: int,
               connections: int = 64) -> dict[str, Any]:
    import httpx

    from recsys.config import to_dict
    from retrieval.bundle import load_bundle

    users = [str(u) for u in load_bundle(run, load_model=False).user_ids]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(to_dict(cfg), f)
        cfg_path = f.name
    rport, kport = free_port(), free_port()
    rurl, kurl = f"http://127.0.0.1:{rport}", f"http://127.0.0.1:{kport}"
    procs = [start("retrieval", cfg_path, run, rport)]
    try:
        wait_ready(rurl, procs[0])
        procs.append(start("ranking", cfg_path, run, kport, rurl))
        wait_ready(kurl, procs[1])
        rng = np.random.default_rng(seed)
        bodies = [json.dumps({"user_id": str(u), "k": k, "candidates": n_cand}).encode()
                  for u in rng.choice(np.asarray(users, dtype=object), 5000)]
        # warm-up (connections, caches, first forward passes)
        asyncio.run(poisson_load(kurl, "/v1/recommend", bodies, min(rate, 20.0), 2.0, seed + 1, 8))
        cpu0 = [cpu_seconds(p.pid) for p in procs]
        res = asyncio.run(poisson_load(kurl, "/v1/recommend", bodies, rate, duration, seed, connections,
                                       inspect=_fallback))
        cpu1 = [cpu_seconds(p.pid) for p in procs]
        n = max(res["requests"], 1)
        try:  # a saturated server may still be draining requests whose clients gave up
            metrics = httpx.get(kurl + "/metrics", timeout=60.0).text
        except httpx.HTTPError:
            metrics = ""
        cpu_ms = {name: (round(1000 * (c1 - c0) / n, 2) if c0 is not None and c1 is not None else None)
                  for name, c0, c1 in zip(("retrieval", "ranking"), cpu0, cpu1, strict=True)}
        return {
            "rate_target": rate, "duration_s": duration, "requests": res["requests"],
            "achieved_rate": round(res["requests"] / res["wall_s"], 1),
            "ok": res["requests"] - len(res["errors"]), "errors": len(res["errors"]),
            "error_kinds": sorted({str(e) for e in res["errors"]}),
            "fallbacks": res["tags"].get("fallback", 0), "latency_from_schedule": pct(res["sched"]),
            "latency_from_send": pct(res["send"]), "server_cpu_ms_per_request": cpu_ms,
            "ranker_server_side": _hist(metrics, "ranking_ranker_seconds"),
            "retrieval_call_server_side": _hist(metrics, "ranking_retrieval_seconds"),
            "load_average": os.getloadavg()[0],
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        os.unlink(cfg_path)


def _hist(text: str, name: str) -> dict[str, float]:
    """Count and mean (ms) of a Prometheus histogram from the exposition text."""
    vals = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(name + suffix + " "):
                vals[suffix] = float(line.split()[-1])
    n = vals.get("_count", 0.0)
    return {"count": int(n), "mean_ms": round(1000 * vals.get("_sum", 0.0) / n, 3) if n else None}


def main(argv: list[str] | None = None) -> int:
    from recsys.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run directory with ranker/ and bundles/CURRENT")
    p.add_argument("--config", help="experiment YAML (the run's serving settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--k", type=int, default=10, help="items per /v1/recommend response")
    p.add_argument("--inproc-requests", type=int, default=500)
    p.add_argument("--rate", type=float, default=100.0, help="requests per second (Poisson arrivals)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of end-to-end load (longer: e.g. 60)")
    p.add_argument("--no-e2e", action="store_true", help="in-process numbers only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the results as JSON here")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    run = Path(a.run)
    res: dict[str, Any] = {"run": str(run), "cpus": os.cpu_count(), "in_process": in_process(cfg, run, a.inproc_requests,
                                                                                           a.candidates, a.seed)}
    print(json.dumps(res["in_process"], indent=2), flush=True)
    if not a.no_e2e:
        res["end_to_end"] = end_to_end(cfg, run, a.rate, a.duration, a.k, a.candidates, a.seed)
        print(json.dumps(res["end_to_end"], indent=2), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
