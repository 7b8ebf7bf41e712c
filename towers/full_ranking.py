"""Exact top-K over the whole catalog with per-user exclusions (no sampled metrics)."""

from __future__ import annotations

import numpy as np
import torch

# Bound on one batch's [users, N] score matrix. With 1M products a 1024-user batch is 4 GiB, and
# top-k's workspace doubles it: peak RSS 7.9 GiB at 136 users/s, against 1.0 GiB at 252 users/s
# with batches of 67 users under this bound (benchmarks/bench_full_ranking.py, 2 threads). Catalogs
# up to 65k products keep 1024-user batches.
MAX_SCORE_BYTES = 256 << 20


def users_per_batch(batch_size: int, n_items: int, itemsize: int = 4, max_bytes: int | None = None) -> int:
    """Users per matrix product: ``batch_size``, lowered so a batch's scores fit in ``max_bytes``
    (default :data:`MAX_SCORE_BYTES`)."""
    limit = MAX_SCORE_BYTES if max_bytes is None else max_bytes
    return max(1, min(batch_size, limit // max(1, n_items * itemsize)))


def topk_excluding(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    exclude: tuple[np.ndarray, np.ndarray] | None,
    k: int,
    batch_size: int = 1024,
    item_bias: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` items by inner product for every user, skipping excluded items and row 0.

    Args:
        user_vecs: [U, d] float (on the device to score on).
        item_vecs: [N, d] float, same device; row 0 is the unknown item and never returned.
        exclude: CSR (indptr [U+1], indices) of items to skip per user, or None.
        k: list length (capped at N - 1).
        batch_size: users per matrix product (lowered to :func:`users_per_batch` for large catalogs).
        item_bias: [N] added to every score (e.g. popularity), or None.

    Returns:
        (indices [U, k] int64, scores [U, k] float32) as numpy arrays, best first.
    """
    U = user_vecs.shape[0]
    k = max(1, min(k, item_vecs.shape[0] - 1))
    out_i = np.zeros((U, k), dtype=np.int64)
    out_s = np.zeros((U, k), dtype=np.float32)
    for start, stop, s in masked_scores(user_vecs, item_vecs, exclude, batch_size):
        if item_bias is not None:
            s += item_bias
        sc, ix = torch.topk(s, k, dim=1)
        out_i[start:stop] = ix.cpu().numpy()
        out_s[start:stop] = sc.float().cpu().numpy()
    return out_i, out_s


def topk_per_bias(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    exclude: tuple[np.ndarray, np.ndarray] | None,
    k: int,
    item_biases: torch.Tensor,
    batch_size: int = 1024,
) -> np.ndarray:
    """:func:`topk_excluding` for several item biases at once: one matrix product per user batch.

    Args:
        user_vecs: [U, d]; item_vecs: [N, d]; exclude: CSR of items to skip per user, or None.
        k: list length (capped at N - 1).
        item_biases: [G, N], one bias per candidate list.

    Returns:
        indices [G, U, k] int64, best first.
    """
    U = user_vecs.shape[0]
    k = max(1, min(k, item_vecs.shape[0] - 1))
    out = np.zeros((item_biases.shape[0], U, k), dtype=np.int64)
    for start, stop, s in masked_scores(user_vecs, item_vecs, exclude, batch_size):
        prev = None
        for g, b in enumerate(item_biases):
            # In place (each step adds the change of bias): a second [batch, N] matrix would double
            # the memory of a 1M-product catalog.
            s.add_(b if prev is None else b - prev)
            prev = b
            out[g, start:stop] = torch.topk(s, k, dim=1).indices.cpu().numpy()
    return out


def masked_scores(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    exclude: tuple[np.ndarray, np.ndarray] | None,
    batch_size: int = 1024,
):
    """Yield ``(start, stop, scores [stop - start, N])`` per user batch, row 0 and exclusions at -inf."""
    U = user_vecs.shape[0]
    batch_size = users_per_batch(batch_size, item_vecs.shape[0], item_vecs.element_size())
    neg_inf = torch.tensor(float("-inf"), device=item_vecs.device)
    with torch.no_grad():
        for start in range(0, U, batch_size):
            stop = min(start + batch_size, U)
            s = user_vecs[start:stop] @ item_vecs.T
            s[:, 0] = neg_inf
            if exclude is not None:
                indptr, idx = exclude
                lo, hi = indptr[start], indptr[stop]
                if hi > lo:
                    rows = np.repeat(np.arange(stop - start), np.diff(indptr[start : stop + 1]))
                    s[torch.from_numpy(rows).to(s.device), torch.from_numpy(idx[lo:hi]).to(s.device)] = neg_inf
            yield start, stop, s
