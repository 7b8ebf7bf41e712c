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


def query_service(cfg, run_dir: Path) -> None:
    """Start the retrieval API on a free loopback port, send a few real requests, print the answers."""
    import threading
    import time

    import pyarrow.parquet as pq
    import uvicorn

    from retrieval.client import RetrievalClient
    from retrieval.service import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(run_dir, cfg), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        with RetrievalClient(url, timeout_s=10.0, retries=2) as client:
            for _ in range(200):
                try:
                    if client.readyz().get("ready", True):
                        break
                except Exception:  # noqa: BLE001 - the server is still starting
                    pass
                time.sleep(0.1)
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
    finally:
        server.should_exit = True
        thread.join(timeout=10)
