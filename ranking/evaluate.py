"""``recsys evaluate-ranker``: the ranker's ordering of the retrieved candidates vs retrieval's own.

On the held-out test period (``RUN_DIR/ranker_data/test``: test-split users, history up to the
test period, top-N retrieved by the towers trained on the train split, nothing added), per user:
NDCG@10, Recall@10 and MRR of both orderings (targets: ``eval.target_events`` in the test split),
with paired bootstrap confidence intervals over users (``ranking.bootstrap_samples``) of each
metric and of the lift. Writes ``RUN_DIR/ranker_eval/report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipelines.schema import EVENT_CODE
from ranking.data import ListData, load_lists, read_data_manifest
from ranking.metrics import bootstrap, compare_orderings
from ranking.model import RankerModel
from recsys.artifacts import atomic_artifact
from recsys.config import Config, to_dict

METRICS = ("ndcg@10", "recall@10", "mrr")


def score_lists(model: RankerModel, data: ListData, batch_size: int = 256) -> np.ndarray:
    """Ranker logits [U, C] for every row of ``data`` (-inf on padding)."""
    out = np.full(data.mask.shape, -np.inf, np.float32)
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            rows = np.arange(s, min(s + batch_size, len(data)))
            b = data.batch(rows)
            logits = model(b).float().numpy()
            out[rows, : logits.shape[1]] = np.where(b["mask"].numpy(), logits, -np.inf)
    return out


def evaluate_lists(scores: np.ndarray, data: ListData, n_candidates: int, samples: int, seed: int) -> dict[str, Any]:
    """Metrics, lifts and bootstrap CIs for scored lists (all users with targets, and the reachable ones)."""
    res = compare_orderings(scores, data, n_candidates, (10,), (10,))
    report: dict[str, Any] = {"users": int(len(res["users"])), "reachable_users": int(res["reachable"].sum())}
    for name, mask in (("all", np.ones(len(res["users"]), bool)), ("reachable", res["reachable"])):
        block = {}
        for m in METRICS:
            block[m] = bootstrap(res["ranker"][m][mask], res["retrieval"][m][mask], samples, seed)
        report[name] = block
    return report


def run(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Evaluate ``RUN_DIR/ranker`` on ``RUN_DIR/ranker_data/test``; returns the report dict."""
    from ranking.train import load_ranker

    t0 = time.time()
    run_dir = Path(run_dir)
    dman = read_data_manifest(run_dir)
    if "test" not in dman.get("phases", {}):
        raise FileNotFoundError(f"{run_dir / 'ranker_data'} has no test lists (the prepared data has no test split)")
    model, desc = load_ranker(run_dir / "ranker")
    n_cand = int(dman["candidates"])
    targets = dman.get("target_events", ["purchase"])
    data = load_lists(run_dir / "ranker_data", "test", n_cand, sum(1 << EVENT_CODE[e] for e in targets))
    scores = score_lists(model, data)
    report = {
        "split": "test",
        "targets": targets,
        "candidates": n_cand,
        "lists": len(data),
        "loss": desc.get("loss"),
        "bootstrap_samples": int(cfg.ranking.bootstrap_samples),
        **evaluate_lists(scores, data, n_cand, int(cfg.ranking.bootstrap_samples), int(cfg.ranking.seed)),
    }
    main = report["all"]["ndcg@10"]
    report["ndcg@10_lift_ci_above_zero"] = bool(main.get("ci") and main["ci"]["lift"][0] > 0)
    report["seconds"] = round(time.time() - t0, 1)
    out = run_dir / "ranker_eval"
    with atomic_artifact(out, {"stage": "evaluate_ranker", "config": to_dict(cfg)}) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.md").write_text(markdown(report))
    _log_mlflow(desc, out, report)
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Ranker vs retrieval order on `{report['split']}` ({report['users']} users with targets "
        f"({', '.join(report['targets'])}), top-{report['candidates']} candidates, loss {report.get('loss')})",
        "",
        f"95% bootstrap intervals over users ({report['bootstrap_samples']} resamples).",
        "",
    ]
    for name, title in (("all", "All users with targets"),
                        ("reachable", f"Users with a target among the candidates ({report['reachable_users']})")):
        lines += [f"## {title}", "", "| metric | retrieval order | ranker | lift | lift 95% CI | relative lift |",
                  "|---|---|---|---|---|---|"]
        for m, r in report[name].items():
            ci = r.get("ci", {}).get("lift", [float("nan")] * 2)
            lines.append(f"| {m} | {r['retrieval']:.4f} | {r['ranker']:.4f} | {r['lift']:+.4f} | "
                         f"[{ci[0]:+.4f}, {ci[1]:+.4f}] | {100 * r['lift_rel']:+.1f}% |")
        lines.append("")
    return "\n".join(lines)


def _log_mlflow(desc: dict[str, Any], out_dir: Path, report: dict[str, Any]) -> None:
    info = desc.get("mlflow") or {}
    if not info.get("run_id"):
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(info["tracking_uri"])
    for m, r in report["all"].items():
        key = m.replace("@", "_at_")
        client.log_metric(info["run_id"], f"test_ranker_{key}", r["ranker"])
        client.log_metric(info["run_id"], f"test_retrieval_{key}", r["retrieval"])
        client.log_metric(info["run_id"], f"test_lift_{key}", r["lift"])
    client.log_artifacts(info["run_id"], str(out_dir), artifact_path="ranker_eval")
