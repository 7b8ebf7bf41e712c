"""Product-level metrics of re-ordered candidate lists, and paired bootstrap confidence intervals.

A list holds one row per (product, offer); the ranker's score of a product is its best offer's
score, retrieval's order is the retrieval rank. Rows added for training (missed positives) are
never evaluated. Relevance is binary (the product has a target event), and Recall / NDCG divide by
all of the user's targets in the split, retrieved or not, so both orderings share one denominator.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from towers.metrics import ranking_metrics


def product_grid(scores: np.ndarray, rank: np.ndarray, target: np.ndarray, valid: np.ndarray,
                 n_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """Per user and retrieval rank: the best row score (-inf empty) and whether the product is a target.

    Args:
        scores, rank, target, valid: [U, C] row arrays (rank 1..N).

    Returns:
        (best score [U, N], target [U, N] bool).
    """
    U = scores.shape[0]
    N = int(n_candidates)
    S = np.full((U, N), -np.inf, np.float64)
    T = np.zeros((U, N), bool)
    u, c = np.nonzero(valid & (rank >= 1) & (rank <= N))
    r = rank[u, c] - 1
    np.maximum.at(S, (u, r), scores[u, c].astype(np.float64))
    T[u[target[u, c]], r[target[u, c]]] = True
    return S, T


def graded_ndcg(scores: np.ndarray, data, n_candidates: int, k: int = 10) -> dict[str, np.ndarray]:
    """Per-list NDCG@k with graded gains (each product's best label weight), ranker vs retrieval order.

    Uses every labelled product of the list (views and carts too), so it has far more signal than
    the purchase-only metrics: the ranker's training monitors it. The ideal ordering is over the
    listed products (added rows excluded), so lists without a labelled product are skipped.
    """
    valid = data.mask & ~data.added
    U, N = scores.shape[0], int(n_candidates)
    S = np.full((U, N), -np.inf, np.float64)
    G = np.zeros((U, N), np.float64)
    u, c = np.nonzero(valid & (data.rank >= 1) & (data.rank <= N))
    r = data.rank[u, c] - 1
    np.maximum.at(S, (u, r), scores[u, c].astype(np.float64))
    np.maximum.at(G, (u, r), data.label[u, c].astype(np.float64))
    has = G.max(1) > 0
    S, G = S[has], G[has]
    kk = min(k, N)
    disc = 1.0 / np.log2(np.arange(2, kk + 2))
    idcg = (-np.sort(-G, 1)[:, :kk] * disc).sum(1)

    def ndcg(order: np.ndarray) -> np.ndarray:
        return (np.take_along_axis(G, order, 1)[:, :kk] * disc).sum(1) / idcg

    return {"ranker": ndcg(np.argsort(-S, axis=1, kind="stable")), "retrieval": ndcg(np.tile(np.arange(N), (len(G), 1)))}


def reorder_hits(S: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hits in retrieval order, hits in score order) [U, N]; empty slots sort last and never hit."""
    order = np.argsort(-S, axis=1, kind="stable")
    return T, np.take_along_axis(T, order, 1)


def compare_orderings(scores: np.ndarray, data, n_candidates: int, ks: tuple[int, ...] = (10,),
                      ndcg_ks: tuple[int, ...] = (10,)) -> dict[str, dict[str, np.ndarray]]:
    """Per-user metrics of the ranker's ordering and retrieval's, for users with targets.

    Args:
        scores: [U, C] ranker scores of ``data``'s rows (a :class:`ranking.data.ListData`).

    Returns:
        ``{"ranker": {metric: [U'] values}, "retrieval": {...}, "users": [U'] row indexes}``.
    """
    valid = data.mask & ~data.added
    S, T = product_grid(scores, data.rank, data.target, valid, n_candidates)
    has = data.n_targets > 0
    ret, rk = reorder_hits(S[has], T[has])
    n_t = data.n_targets[has]
    return {
        "ranker": ranking_metrics(rk, n_t, ks, ndcg_ks),
        "retrieval": ranking_metrics(ret, n_t, ks, ndcg_ks),
        "users": np.flatnonzero(has),
        "reachable": T[has].any(1),
    }


def bootstrap(ranker: np.ndarray, baseline: np.ndarray, samples: int, seed: int, alpha: float = 0.05,
              chunk: int = 200) -> dict[str, Any]:
    """Paired bootstrap over users of the mean of each, their difference and the relative lift.

    Returns:
        ``{"ranker": m, "retrieval": m, "lift": m_r - m_b, "lift_rel": m_r / m_b - 1,
        "ci": {same keys: [lo, hi]}, "p_le_zero": share of resamples with lift <= 0}``.
    """
    a = np.asarray(ranker, np.float64)
    b = np.asarray(baseline, np.float64)
    U = len(a)
    out: dict[str, Any] = {
        "ranker": float(a.mean()) if U else 0.0,
        "retrieval": float(b.mean()) if U else 0.0,
    }
    out["lift"] = out["ranker"] - out["retrieval"]
    out["lift_rel"] = out["ranker"] / out["retrieval"] - 1.0 if out["retrieval"] > 0 else float("nan")
    if U == 0 or samples <= 0:
        out["ci"] = {}
        return out
    rng = np.random.default_rng(seed)
    ma, mb = [], []
    p = np.full(U, 1.0 / U)
    for s in range(0, samples, chunk):
        w = rng.multinomial(U, p, size=min(chunk, samples - s)).astype(np.float64) / U
        ma.append(w @ a)
        mb.append(w @ b)
    ma, mb = np.concatenate(ma), np.concatenate(mb)
    lift = ma - mb
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(mb > 0, ma / mb - 1.0, np.nan)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]

    def ci(x: np.ndarray) -> list[float]:
        x = x[np.isfinite(x)]
        return [float(v) for v in np.percentile(x, q)] if len(x) else [float("nan")] * 2

    out["ci"] = {"ranker": ci(ma), "retrieval": ci(mb), "lift": ci(lift), "lift_rel": ci(rel)}
    out["p_le_zero"] = float((lift <= 0).mean())
    return out
