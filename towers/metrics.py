"""Ranking metrics over full-catalog top-K lists (binary relevance)."""

from __future__ import annotations

import numpy as np


def hits_matrix(topk: np.ndarray, target_indptr: np.ndarray, target_indices: np.ndarray) -> np.ndarray:
    """Whether each recommended item is a target of its user.

    Args:
        topk: [U, K] recommended item indexes per user.
        target_indptr, target_indices: CSR of each user's target items (sorted within a row).

    Returns:
        [U, K] bool.
    """
    U, K = topk.shape
    counts = np.diff(target_indptr)
    # Shift item ids by row so one searchsorted answers membership for all rows at once.
    big = np.int64(topk.max(initial=0) + target_indices.max(initial=0) + 2)
    keys = np.repeat(np.arange(U, dtype=np.int64), counts) * big + target_indices
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    q = np.arange(U, dtype=np.int64)[:, None] * big + topk.astype(np.int64)
    pos = np.searchsorted(keys, q)
    pos = np.minimum(pos, max(len(keys) - 1, 0))
    return (keys[pos] == q) if len(keys) else np.zeros_like(topk, dtype=bool)


def ranking_metrics(hits: np.ndarray, n_targets: np.ndarray, ks: tuple[int, ...], ndcg_ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per-user Recall@K, NDCG@K, HitRate@K and MRR (within the list).

    Args:
        hits: [U, Kmax] bool from :func:`hits_matrix`.
        n_targets: [U] number of targets of each user (> 0).
        ks: cut-offs for recall and hit rate.
        ndcg_ks: cut-offs for NDCG.

    Returns:
        name -> [U] float per-user values (average them for the overall number).
    """
    out: dict[str, np.ndarray] = {}
    n = np.maximum(n_targets, 1).astype(np.float64)
    cum = np.cumsum(hits, axis=1)
    Kmax = hits.shape[1]
    for k in ks:
        kk = min(k, Kmax)
        out[f"recall@{k}"] = cum[:, kk - 1] / n
        out[f"hit@{k}"] = (cum[:, kk - 1] > 0).astype(np.float64)
    disc = 1.0 / np.log2(np.arange(2, Kmax + 2))
    for k in ndcg_ks:
        kk = min(k, Kmax)
        dcg = (hits[:, :kk] * disc[:kk]).sum(1)
        ideal_n = np.minimum(n_targets, kk).astype(int)
        idcg = np.concatenate([[0.0], np.cumsum(disc[:kk])])[ideal_n]
        out[f"ndcg@{k}"] = np.where(idcg > 0, dcg / np.maximum(idcg, 1e-12), 0.0)
    first = np.where(hits.any(1), hits.argmax(1) + 1, 0)
    out["mrr"] = np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)
    return out
