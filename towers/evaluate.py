"""``recsys evaluate``: full-ranking evaluation of products and sellers, with slices and baselines."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.artifacts import atomic_artifact
from recsys.config import Config, to_dict
from towers.baselines import als_factors, popularity_vectors, train_counts
from towers.checkpoint import load_towers
from towers.datamodule import event_codes
from towers.eval_data import EvalQueries, build_queries
from towers.full_ranking import topk_excluding
from towers.metrics import hits_matrix, ranking_metrics


def user_vectors(model, q: EvalQueries, batch: int = 4096) -> torch.Tensor:
    """Unit user vectors [U, d] for the queries."""
    out = []
    with torch.no_grad():
        for s in range(0, len(q), batch):
            e = slice(s, s + batch)
            out.append(
                model.user_vectors(
                    {
                        "user_idx": torch.from_numpy(q.user_idx[e]),
                        "hist_products": torch.from_numpy(q.hist_products[e]),
                        "hist_sellers": torch.from_numpy(q.hist_sellers[e]),
                        "hour": torch.from_numpy(q.hour[e]),
                        "dow": torch.from_numpy(q.dow[e]),
                    }
                )
            )
    return torch.cat(out) if out else torch.zeros(0, model.shape.dim)


def all_vectors(fn, n: int, chunk: int = 65536) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(torch.arange(s, min(s + chunk, n))) for s in range(0, n, chunk)])


def _restrict(targets: tuple[np.ndarray, np.ndarray], keep_item: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Targets limited to items where ``keep_item`` is true; returns (rows with any, CSR of those rows)."""
    indptr, idx = targets
    rows_of = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    m = keep_item[idx]
    counts = np.bincount(rows_of[m], minlength=len(indptr) - 1)
    rows = np.where(counts > 0)[0]
    new_indptr = np.concatenate([[0], np.cumsum(counts[rows])]).astype(np.int64)
    # rows_of[m] is sorted, so idx[m] is already grouped by row in order
    return rows, (new_indptr, idx[m])


def score_lists(
    top: np.ndarray,
    q: EvalQueries,
    targets: tuple[np.ndarray, np.ndarray],
    ks: tuple[int, ...],
    ndcg_ks: tuple[int, ...],
    counts: np.ndarray,
    n_catalog: int,
    slices: dict[str, np.ndarray],
    cold_items: np.ndarray | None,
) -> dict[str, Any]:
    """Overall and per-slice metrics for given top-K lists."""
    n_t = np.diff(targets[0])
    has = n_t > 0
    h = hits_matrix(top, *targets)
    per = ranking_metrics(h[has], n_t[has], ks, ndcg_ks)
    res: dict[str, Any] = {k: float(v.mean()) if len(v) else 0.0 for k, v in per.items()}
    res["users"] = int(has.sum())
    for k in (10, max(ks)):
        kk = min(k, top.shape[1])
        res[f"coverage@{k}"] = float(len(np.unique(top[:, :kk])) / max(n_catalog - 1, 1))
    kk = min(20, top.shape[1])
    res["avg_pop@20"] = float(counts[top[:, :kk]].mean()) if top.size else 0.0
    sl: dict[str, Any] = {}
    for name, mask in slices.items():
        m = mask & has
        if m.any():
            sl[name] = {k: float(v[m[has]].mean()) for k, v in per.items()} | {"users": int(m.sum())}
    if cold_items is not None and cold_items.any():
        rows, ct = _restrict(targets, cold_items)
        if len(rows):
            hc = hits_matrix(top[rows], *ct)
            pc = ranking_metrics(hc, np.diff(ct[0]), ks, ndcg_ks)
            sl["cold_start_items"] = {k: float(v.mean()) for k, v in pc.items()} | {"users": int(len(rows))}
    res["slices"] = sl
    return res


def eval_device(name: str) -> torch.device:
    """``eval.device`` as a torch device: ``cpu``, ``cuda`` (``cuda:N``), or ``auto`` (cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"eval.device={name!r}, but torch sees no GPU (use cpu or auto)")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"eval.device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


def evaluated_model_dir(run_dir: Path, split: str) -> Path:
    """The model to evaluate on ``split``: the full-data refit when it never saw that split, else
    the model selected on validation (trained on the train split only)."""
    full = run_dir / "model_full" / "model.json"
    if full.exists() and split not in json.loads(full.read_text()).get("train_splits", []):
        return full.parent
    return run_dir / "model"


def run(cfg: Config, run_dir: str | Path, prepared: str | Path | None = None, split: str = "test",
        baselines: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Evaluate the trained towers (and baselines) on ``split`` by ranking every product and seller.

    Returns:
        The report dict, also written to ``RUN_DIR/eval/report.json`` and ``report.md``.
    """
    run_dir = Path(run_dir)
    model_dir = evaluated_model_dir(run_dir, split)
    model, desc = load_towers(model_dir)
    prepared = Path(prepared or desc["prepared"])
    shape = model.shape
    t0 = time.time()
    exclude_splits = ("train",) if split == "val" else ("train", "val")
    tev = event_codes(cfg.eval.target_events) or None
    q = build_queries(prepared, split, cfg.data.max_history, tev, event_codes(cfg.data.bought_events), exclude_splits)
    target_note = list(cfg.eval.target_events)
    if len(q) == 0:
        q = build_queries(prepared, split, cfg.data.max_history, None, event_codes(cfg.data.bought_events), exclude_splits)
        target_note = ["all positives"]
    if not cfg.eval.exclude_train:
        q = EvalQueries(q.user_idx, q.hist_products, q.hist_sellers, q.hour, q.dow, q.targets, q.seller_targets,
                        (np.zeros(len(q) + 1, np.int64), np.zeros(0, np.int64)))
    ks, ndcg_ks = tuple(cfg.eval.ks), tuple(cfg.eval.ndcg_ks)
    K = max(ks)
    pcount, scount = train_counts(prepared, shape.n_products, shape.n_sellers)
    hist_len = (q.hist_products > 0).sum(1)
    thr = np.quantile(hist_len, cfg.eval.heavy_user_quantile) if len(q) else 0
    slices = {
        "light_users": hist_len <= np.quantile(hist_len, 0.2) if len(q) else np.zeros(0, bool),
        "heavy_users": hist_len >= thr if len(q) else np.zeros(0, bool),
        "no_history_users": hist_len == 0,
    }
    cold_products = pcount <= 0
    cold_products[0] = False
    cold_sellers = scount <= 0
    cold_sellers[0] = False

    dev = eval_device(cfg.eval.device)

    def evaluate(name: str, uvec, pvec, svec, pbias=None) -> dict[str, Any]:
        # the vectors are built on the CPU; the [users, catalog] products run on `dev`
        uvec, pvec = uvec.to(dev), pvec.to(dev)
        svec = svec.to(dev) if svec is not None else None
        pbias = pbias.to(dev) if pbias is not None else None
        top, _ = topk_excluding(uvec, pvec, q.exclude, K, cfg.eval.batch_users, item_bias=pbias)
        out = {"products": score_lists(top, q, q.targets, ks, ndcg_ks, pcount, shape.n_products, slices, cold_products)}
        if shape.has_sellers and svec is not None and len(q.seller_targets[1]):
            stop, _ = topk_excluding(uvec, svec, None, min(K, shape.n_sellers - 1), cfg.eval.batch_users)
            sk = tuple(k for k in ks if k < shape.n_sellers) or (1,)
            out["sellers"] = score_lists(stop, q, q.seller_targets, sk, tuple(k for k in ndcg_ks if k < shape.n_sellers) or (1,),
                                         scount, shape.n_sellers, slices, cold_sellers)
        return out

    report: dict[str, Any] = {"split": split, "targets": target_note, "users": len(q), "models": {},
                              "model_dir": model_dir.name, "model_train_splits": desc.get("train_splits", ["train"])}
    with torch.no_grad():
        uvec = user_vectors(model, q)
        pvec = all_vectors(model.product_vectors, shape.n_products)
        svec = all_vectors(model.seller_vectors, shape.n_sellers) if shape.has_sellers else None
        pbias = model.product_offsets(torch.arange(shape.n_products))
    report["models"]["two_tower"] = evaluate("two_tower", uvec, pvec, svec, pbias)
    report["models"]["two_tower"]["popularity_prior"] = round(float(model.popularity_prior), 6)
    report["models"]["two_tower"]["seconds"] = round(time.time() - t0, 1)
    for b in baselines if baselines is not None else cfg.eval.baselines:
        t1 = time.time()
        if b == "popularity":
            u1, p1 = popularity_vectors(pcount, len(q))
            s1 = popularity_vectors(scount, len(q))[1] if shape.has_sellers else None
            report["models"]["popularity"] = evaluate(b, u1, p1, s1)
        elif b == "als":
            uf, itf = als_factors(prepared, "product_idx", shape.n_products, shape.n_users, cfg.eval, cfg.data.spark, cfg.train.seed)
            su = ss = None
            if shape.has_sellers:
                su, sf = als_factors(prepared, "seller_idx", shape.n_sellers, shape.n_users, cfg.eval, cfg.data.spark, cfg.train.seed)
                su, ss = torch.from_numpy(su[q.user_idx]), torch.from_numpy(sf)
            r = evaluate(b, torch.from_numpy(uf[q.user_idx]), torch.from_numpy(itf), None)
            if su is not None and len(q.seller_targets[1]):
                r["sellers"] = evaluate(b, su, torch.zeros(shape.n_products, su.shape[1]), ss)["sellers"]
            report["models"]["spark_als"] = r
        else:
            raise ValueError(f"eval.baselines: unknown baseline {b!r} (choose popularity, als)")
        report["models"][("spark_als" if b == "als" else b)]["seconds"] = round(time.time() - t1, 1)
    report["config"] = to_dict(cfg)
    out_dir = run_dir / "eval"
    with atomic_artifact(out_dir, {"stage": "evaluate", "split": split, "config": to_dict(cfg)}) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.md").write_text(markdown_table(report))
    _log_mlflow(desc, out_dir, report)
    return report


def markdown_table(report: dict[str, Any]) -> str:
    """Side-by-side Markdown table of the main metrics for every model and target kind."""
    lines = [f"# Evaluation on `{report['split']}` ({report['users']} users, targets: {', '.join(report['targets'])})", ""]
    for what in ("products", "sellers"):
        rows = [(m, r[what]) for m, r in report["models"].items() if what in r]
        if not rows:
            continue
        keys = [k for k in rows[0][1] if k not in ("slices", "users")]
        lines += [f"## {what}", "", "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for m, r in rows:
            lines.append(f"| {m} | " + " | ".join(f"{r.get(k, float('nan')):.4f}" for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def _log_mlflow(desc: dict[str, Any], out_dir: Path, report: dict[str, Any]) -> None:
    info = desc.get("mlflow") or {}
    if not info.get("run_id"):
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(info["tracking_uri"])
    for what in ("products", "sellers"):
        r = report["models"]["two_tower"].get(what)
        if r:
            for k, v in r.items():
                if isinstance(v, float):
                    client.log_metric(info["run_id"], f"{report['split']}_{what}_{k.replace('@', '_at_')}", v)
    client.log_artifacts(info["run_id"], str(out_dir), artifact_path="eval")
