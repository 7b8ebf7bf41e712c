"""Evaluation queries from the prepared artifact: one query per user with targets and exclusions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

from data_pipelines.arrays import pad_list_column


@dataclass(frozen=True)
class EvalQueries:
    """Per-user evaluation queries (arrays aligned on the user axis U).

    Attributes:
        user_idx: [U] int64.
        hist_products, hist_sellers: [U, L] int64 (the user's history as of the split's start).
        hour, dow: [U] int64 context (of the user's first event in the split).
        targets: (indptr [U+1], indices) CSR of held-out product indexes.
        seller_targets: CSR of held-out seller indexes.
        exclude: CSR of product indexes to exclude (the user's already-bought items).
    """

    user_idx: np.ndarray
    hist_products: np.ndarray
    hist_sellers: np.ndarray
    hour: np.ndarray
    dow: np.ndarray
    targets: tuple[np.ndarray, np.ndarray]
    seller_targets: tuple[np.ndarray, np.ndarray]
    exclude: tuple[np.ndarray, np.ndarray]

    def __len__(self) -> int:
        return len(self.user_idx)

    def subset(self, rows: np.ndarray) -> EvalQueries:
        def csr(c):
            indptr, idx = c
            parts = [idx[indptr[r] : indptr[r + 1]] for r in rows]
            lens = np.array([len(p) for p in parts], dtype=np.int64)
            return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), (
                np.concatenate(parts) if parts else np.zeros(0, np.int64)
            )

        return EvalQueries(
            self.user_idx[rows], self.hist_products[rows], self.hist_sellers[rows], self.hour[rows],
            self.dow[rows], csr(self.targets), csr(self.seller_targets), csr(self.exclude),
        )


def _csr(groups: np.ndarray, values: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique sorted values per group as CSR. groups in [0, n_groups)."""
    if len(groups) == 0:
        return np.zeros(n_groups + 1, np.int64), np.zeros(0, np.int64)
    key = np.unique(groups.astype(np.int64) * (int(values.max(initial=0)) + 1) + values.astype(np.int64))
    g = key // (int(values.max(initial=0)) + 1)
    v = key % (int(values.max(initial=0)) + 1)
    counts = np.bincount(g, minlength=n_groups)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), v.astype(np.int64)


def read_examples(path: str | Path, columns: list[str] | None = None):
    """The examples of one split as an Arrow table (empty table when the split has no files)."""
    return ds.dataset(str(path), format="parquet").to_table(columns=columns)


def build_queries(
    prepared: str | Path,
    split: str,
    max_history: int,
    target_events: tuple[int, ...] | None = None,
    exclude_events: tuple[int, ...] = (2,),
    exclude_splits: tuple[str, ...] = ("train",),
) -> EvalQueries:
    """One query per user who has a target in ``split``.

    Args:
        prepared: the prepared artifact directory.
        split: "val" or "test".
        max_history: history width L.
        target_events: event codes that count as targets (None = all positives).
        exclude_events: event codes whose products are excluded when already seen ("already bought").
        exclude_splits: splits whose events define the exclusions.

    Returns:
        :class:`EvalQueries` sorted by user index.
    """
    prepared = Path(prepared)
    t = read_examples(prepared / "examples" / split)
    user = np.asarray(t["user_idx"], dtype=np.int64)
    prod = np.asarray(t["product_idx"], dtype=np.int64)
    sell = np.asarray(t["seller_idx"], dtype=np.int64)
    event = np.asarray(t["event"], dtype=np.int64)
    ts = np.asarray(t["ts"], dtype=np.int64)
    keep = np.ones(len(user), bool) if target_events is None else np.isin(event, np.asarray(target_events))
    users = np.unique(user[keep])
    # The query is the user's earliest example in the split: its history holds only earlier events.
    order = np.lexsort((ts, user))
    first_row = order[np.searchsorted(user[order], users)]
    hp, _ = pad_list_column(t["hist_products"].take(first_row), max_history)
    hs, _ = pad_list_column(t["hist_sellers"].take(first_row), max_history)
    g = np.searchsorted(users, user[keep])
    targets = _csr(g, prod[keep], len(users))
    sk = keep & (sell > 0)
    seller_targets = _csr(np.searchsorted(users, user[sk]), sell[sk], len(users))
    ex_u, ex_p = [], []
    for s in exclude_splits:
        e = read_examples(prepared / "examples" / s, ["user_idx", "product_idx", "event"])
        eu = np.asarray(e["user_idx"], dtype=np.int64)
        m = np.isin(np.asarray(e["event"], dtype=np.int64), np.asarray(exclude_events)) & np.isin(eu, users)
        ex_u.append(eu[m])
        ex_p.append(np.asarray(e["product_idx"], dtype=np.int64)[m])
    eu = np.concatenate(ex_u) if ex_u else np.zeros(0, np.int64)
    ep = np.concatenate(ex_p) if ex_p else np.zeros(0, np.int64)
    exclude = _csr(np.searchsorted(users, eu), ep, len(users))
    return EvalQueries(
        user_idx=users,
        hist_products=hp,
        hist_sellers=hs,
        hour=np.asarray(t["hour"], dtype=np.int64)[first_row],
        dow=np.asarray(t["dow"], dtype=np.int64)[first_row],
        targets=targets,
        seller_targets=seller_targets,
        exclude=exclude,
    )
