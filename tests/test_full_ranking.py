"""Exact full-catalog top-K (towers.full_ranking) against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from towers import full_ranking
from towers.full_ranking import topk_excluding, users_per_batch


def _reference(u: np.ndarray, items: np.ndarray, exclude: list[list[int]], k: int, bias: np.ndarray | None):
    s = u.astype(np.float64) @ items.T.astype(np.float64) + (0.0 if bias is None else bias)
    s[:, 0] = -np.inf
    for row, ex in enumerate(exclude):
        s[row, ex] = -np.inf
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(s, top, 1)


@pytest.mark.parametrize("batch_size,max_bytes", [(1024, None), (3, None), (1024, 7 * 50 * 4)])
def test_topk_excluding_matches_brute_force(monkeypatch, batch_size: int, max_bytes: int | None) -> None:
    if max_bytes is not None:  # a catalog "too large" for the batch: 7 users per product
        monkeypatch.setattr(full_ranking, "MAX_SCORE_BYTES", max_bytes)
    g = np.random.default_rng(0)
    U, N, d, k = 23, 50, 8, 10
    u, items = g.normal(size=(U, d)).astype(np.float32), g.normal(size=(N, d)).astype(np.float32)
    bias = g.normal(size=N).astype(np.float32)
    exclude = [sorted(g.choice(np.arange(1, N), g.integers(0, 30), replace=False).tolist()) for _ in range(U)]
    indptr = np.concatenate([[0], np.cumsum([len(e) for e in exclude])]).astype(np.int64)
    csr = (indptr, np.concatenate([np.array(e, np.int64) for e in exclude]))
    top, sc = topk_excluding(torch.from_numpy(u), torch.from_numpy(items), csr, k, batch_size, torch.from_numpy(bias))
    want, want_sc = _reference(u, items, exclude, k, bias)
    np.testing.assert_array_equal(top, want)
    np.testing.assert_allclose(sc, want_sc, rtol=1e-5, atol=1e-5)
    assert not any(set(top[r]) & set(exclude[r]) for r in range(U)) and (top != 0).all()


def test_users_per_batch_bounds_the_score_matrix() -> None:
    assert users_per_batch(1024, 40_981) == 1024  # Gowalla: unchanged
    assert users_per_batch(1024, 1_000_000) == 67  # 1M products: 256 MiB of float32 scores
    assert users_per_batch(1024, 1_000_000, itemsize=2) == 134
    assert users_per_batch(1024, 10**12) == 1


def test_eval_device_setting() -> None:
    from towers.evaluate import eval_device

    assert eval_device("cpu") == torch.device("cpu")
    assert eval_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="eval.device must be cpu, cuda or auto"):
        eval_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no GPU"):
            eval_device("cuda")
