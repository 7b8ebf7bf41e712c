"""Co-occurrence neighbours of each product: the products its users also chose.

The product tower adds the mean id embedding of these neighbours to a product's own (item-side
smoothing over the user-item graph, as a graph layer would do): a rare product borrows from the
products it is chosen with. The neighbours are computed from the training examples only, so
held-out interactions never leak into them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp


def pair_cap(items_per_user: np.ndarray, cap: int, max_pairs: int) -> int:
    """The largest per-user item cap ``c <= cap`` with ``sum(min(n_u, c) ** 2) <= max_pairs`` (at least 2).

    Args:
        items_per_user: (U,) distinct items of each user.
        cap: the configured cap.
        max_pairs: budget of co-occurrence pairs (bounds time and memory on large logs).
    """
    n = np.asarray(items_per_user, dtype=np.int64)
    lo, hi = 2, max(int(cap), 2)
    if (np.minimum(n, hi) ** 2).sum() <= max_pairs:
        return hi
    while lo < hi:  # binary search: the pair count grows with c
        mid = (lo + hi + 1) // 2
        if (np.minimum(n, mid) ** 2).sum() <= max_pairs:
            lo = mid
        else:
            hi = mid - 1
    return lo


def cooccurrence_neighbors(
    user_idx: np.ndarray,
    product_idx: np.ndarray,
    n_products: int,
    k: int,
    max_items_per_user: int = 200,
    max_pairs: int = 50_000_000,
    seed: int = 0,
    block_pairs: int = 4_000_000,
) -> np.ndarray:
    """The ``k`` products most often chosen by the same users as each product (cosine-normalised).

    The score of (i, j) is ``c_ij / sqrt(n_i n_j)``: c_ij users chose both, n_i chose i. Users with
    more than the per-user cap (see :func:`pair_cap`) contribute a seeded random subset of their items.

    Args:
        user_idx: (E,) user index of each interaction (0 = unknown, ignored).
        product_idx: (E,) product index of each interaction (0 = unknown, ignored).
        n_products: product table size (row 0 included).
        k: neighbours per product.
        max_items_per_user: cap on a user's items.
        max_pairs: budget of co-occurrence pairs; lowers the cap on large logs.
        seed: seed of the per-user subsets.
        block_pairs: co-occurrence entries scored at a time (bounds memory).

    Returns:
        (n_products, k) int32: neighbour indexes, best first, 0-padded (products with fewer
        co-occurring products, unseen products and row 0 have 0s).
    """
    out = np.zeros((n_products, k), dtype=np.int32)
    u = np.asarray(user_idx, dtype=np.int64)
    p = np.asarray(product_idx, dtype=np.int64)
    ok = (u > 0) & (p > 0) & (p < n_products)
    if k <= 0 or not ok.any():
        return out
    # distinct (user, product) pairs in a seeded random order within each user
    pairs = np.unique(u[ok] * n_products + p[ok])
    u, p = pairs // n_products, pairs % n_products
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(u)), u))
    u, p = u[order], p[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    counts = np.diff(np.r_[starts, len(u)])
    cap = pair_cap(counts, max_items_per_user, max_pairs)
    rank = np.arange(len(u)) - np.repeat(starts, counts)
    keep = rank < cap
    u, p = u[keep], p[keep]
    _, u = np.unique(u, return_inverse=True)
    R = sp.csr_matrix((np.ones(len(u), dtype=np.float32), (u, p)), shape=(int(u.max()) + 1, n_products))
    deg = np.asarray(R.sum(0), dtype=np.float64).ravel()
    Rt = R.T.tocsr()  # products x users
    # Blocks of products whose co-occurrence rows hold at most ``block_pairs`` entries (bounded by
    # the sum of their users' item counts), so memory stays flat however large the log is.
    bound = np.cumsum(Rt @ np.asarray(R.sum(1), dtype=np.float64).ravel())
    a = 0
    while a < n_products:
        b = max(int(np.searchsorted(bound, (bound[a - 1] if a else 0.0) + block_pairs, side="right")), a + 1)
        b = min(b, n_products)
        _top_k_rows(Rt[a:b] @ R, a, deg, k, out)
        a = b
    return out


def _top_k_rows(C: sp.csr_matrix, first: int, deg: np.ndarray, k: int, out: np.ndarray) -> None:
    """Write the ``k`` best-scored columns of each row of a block of co-occurrence rows into ``out``.

    Args:
        C: (rows, n_products) co-occurrence counts of products ``first .. first + rows - 1``.
        first: the block's first product.
        deg: (n_products,) users per product.
        k: neighbours per product.
        out: (n_products, k) int32, written in place.
    """
    C = C.tocsr()
    C.sort_indices()
    local = np.repeat(np.arange(C.shape[0], dtype=np.int64), np.diff(C.indptr))
    rows = local + first
    cols = C.indices.astype(np.int64)
    score = C.data / np.sqrt(deg[rows] * deg[cols])
    score[rows == cols] = -1.0  # a product is not its own neighbour
    # Best first within each row, ties by the lower index: one stable sort of an int64 key (row in
    # the high bits, the score's 31-bit complement below) is 3x faster than a three-key lexsort.
    q = np.round(np.clip(score, 0.0, 1.0) * (2**31 - 2)).astype(np.int64)
    order = np.argsort((local << 32) | ((2**31 - 1) - q), kind="stable")
    local, cols, score = local[order], cols[order], score[order]
    pos = np.arange(len(local)) - C.indptr[local]
    top = (pos < k) & (score > 0)
    out[local[top] + first, pos[top]] = cols[top]


def neighbors_from_examples(
    prepared: str | Path, splits: Sequence[str], n_products: int, k: int, seed: int = 0
) -> np.ndarray:
    """:func:`cooccurrence_neighbors` of the examples of ``splits`` in a prepared artifact.

    Returns:
        (n_products, k) int32, 0-padded; all zeros when the splits have no examples.
    """
    users, products = [], []
    for s in splits:
        path = Path(prepared) / "examples" / s
        if path.exists():
            t = pq.read_table(path, columns=["user_idx", "product_idx"])
            users.append(np.asarray(t["user_idx"], dtype=np.int64))
            products.append(np.asarray(t["product_idx"], dtype=np.int64))
    if not users:
        return np.zeros((n_products, k), dtype=np.int32)
    return cooccurrence_neighbors(np.concatenate(users), np.concatenate(products), n_products, k, seed=seed)
