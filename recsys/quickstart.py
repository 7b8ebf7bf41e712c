"""``recsys quickstart``: the whole system on the built-in synthetic marketplace, in one command."""

from __future__ import annotations

import json
from pathlib import Path

from recsys import pipeline
from recsys.config import load_config

SYNTHETIC_SMALL = Path(__file__).resolve().parents[1] / "configs" / "synthetic-small.yaml"


def _table(report: dict) -> str:
    lines = ["", "Held-out purchases, full-catalog ranking (test split):", ""]
    header = f"{'model':<14} {'what':<9} {'Recall@10':>10} {'Recall@20':>10} {'NDCG@20':>9} {'MRR':>7}"
    lines += [header, "-" * len(header)]
    for model, r in report["models"].items():
        for what in ("products", "sellers"):
            if what in r:
                m = r[what]
                lines.append(
                    f"{model:<14} {what:<9} {m.get('recall@10', 0):>10.4f} {m.get('recall@20', 0):>10.4f} "
                    f"{m.get('ndcg@20', m.get('ndcg@10', 0)):>9.4f} {m.get('mrr', 0):>7.4f}"
                )
    return "\n".join(lines)


def run(out: str | Path, config: str | None = None, overrides: list[str] | tuple[str, ...] = (), serve: bool = True) -> int:
    """Fit on the synthetic marketplace, print metrics and artifact locations (and query the API).

    Returns:
        Process exit code.
    """
    out = Path(out)
    path = config or (SYNTHETIC_SMALL if SYNTHETIC_SMALL.exists() else None)
    over = list(overrides) if path else ["data.source=synthetic", *overrides]
    cfg = load_config(path, over)
    pipeline.fit(cfg, out)
    report = json.loads((out / "eval" / "report.json").read_text())
    print(_table(report))
    ranker_md = out / "ranker_eval" / "report.md"
    if ranker_md.exists():
        print("\n" + ranker_md.read_text())
    print("\nArtifacts:")
    for name in ("raw", "prepared", "model", "eval", "model_full", "export", "index", "bundles", "ranker_data", "ranker", "ranker_eval", "mlflow.db"):
        p = out / name
        if p.exists():
            print(f"  {name:<11} {p}")
    print(f"\nMLflow UI:  mlflow ui --backend-store-uri sqlite:///{(out / 'mlflow.db').resolve()}")
    if serve:
        query_service(cfg, out)
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(app, port: int):
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return server, thread


def _wait_ready(get, tries: int = 300) -> None:
    import time

    for _ in range(tries):
        try:
            get()
            return
        except Exception:  # noqa: BLE001 - the server is still starting
            time.sleep(0.1)


def query_ranking(cfg, run_dir: Path, retrieval_url: str, users: list[str]) -> None:
    """Start the ranking API against the running retrieval API and call ``/v1/recommend`` end to end."""
    import httpx

    from ranking.scorer import Ranker
    from ranking.service import create_app

    ranker = Ranker.load(run_dir / "ranker", run_dir)
    port = _free_port()
    server, thread = _start(create_app(ranker, cfg, retrieval_url), port)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=10.0) as http:
            _wait_ready(lambda: http.get("/healthz").raise_for_status())
            print(f"\nRanking API at {url} (retrieve over HTTP, then rank; OpenAPI: {url}/docs)")
            for uid in users:
                r = http.post("/v1/recommend", json={"user_id": uid, "k": 5}, headers={"X-Request-ID": f"quickstart-{uid}"})
                r.raise_for_status()
                b = r.json()
                items = ", ".join(f"{i['product_id']}@{i.get('seller_id')}(was #{i['retrieval_rank']})" for i in b["items"])
                print(f"  POST /v1/recommend user={uid} k=5 → {items}")
                print(f"      request {b['request_id']}, bundle {b['bundle_version']}, ranker {b['ranker_version']}, "
                      f"fallback={b['fallback']}")
            pid = b["items"][0]["product_id"] if b["items"] else None
            if pid:
                r = http.get(f"/v1/products/{pid}/best-sellers", params={"user_id": users[0], "k": 3})
                r.raise_for_status()
                print(f"  GET /v1/products/{pid}/best-sellers → {[(x['seller_id'], x.get('price')) for x in r.json()['sellers']]}")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def query_service(cfg, run_dir: Path) -> None:
    """Start the retrieval API on a free loopback port, send a few real requests, print the answers;
    with a trained ranker, also start the ranking API and call its end-to-end ``/v1/recommend``."""
    import pyarrow.parquet as pq

    from retrieval.client import RetrievalClient
    from retrieval.service import create_app

    port = _free_port()
    server, thread = _start(create_app(run_dir, cfg), port)
    url = f"http://127.0.0.1:{port}"
    try:
        with RetrievalClient(url, timeout_s=10.0, retries=2) as client:
            _wait_ready(client.readyz)
            users = pq.read_table(run_dir / "prepared" / "vocab" / "users.parquet", columns=["id"])["id"].to_pylist()[:2]
            print(f"\nRetrieval API at {url} (OpenAPI: {url}/docs)")
            for uid in users:
                r = client.retrieve_products(user_id=uid, k=5, filters={"in_stock": True})
                items = ", ".join(f"{c['product_id']}@{c.get('seller_id')}" for c in r["candidates"])
                print(f"  POST /v1/retrieve/products user={uid} k=5 in_stock → {items}  (bundle {r['bundle_version']})")
            r = client.retrieve_products(user_id="someone-new", k=3)
            print(f"  unknown user → fallback={r.get('fallback')}: {[c['product_id'] for c in r['candidates']]}")
            r = client.retrieve_sellers(user_id=users[0], k=3)
            print(f"  POST /v1/retrieve/sellers user={users[0]} → {[c['seller_id'] for c in r['sellers']]}")
            pid = client.retrieve_products(user_id=users[0], k=1)["candidates"][0]["product_id"]
            r = client.product_sellers(pid, user_id=users[0], k=3)
            print(f"  GET /v1/products/{pid}/sellers → {[(c['seller_id'], c['price']) for c in r['sellers']]}")
        if (run_dir / "ranker" / "manifest.json").exists():
            query_ranking(cfg, run_dir, url, users)
        else:
            print("\n(no trained ranker in this run: ranking.enabled is false or its stage failed; see stages.json)")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
