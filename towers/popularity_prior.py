"""The weight of product popularity in the score, chosen on the validation split after training.

The towers are trained with logQ correction, so the cosine scores what a user prefers beyond what
everyone picks; the unit vectors cannot add popularity back. Whether a ranking should lean towards
popular products is a property of the data, so the weight ``beta`` of the score
``cos(u, p) / temperature + beta * log_popularity_p`` is chosen like the epoch count: on validation
Recall@K, from ``train.popularity_prior_grid`` (ties go to the smaller weight; a grid of ``(0.0,)``
turns the prior off).
"""

from __future__ import annotations

import numpy as np
import torch

from towers.eval_data import EvalQueries
from towers.full_ranking import topk_per_bias
from towers.metrics import hits_matrix, ranking_metrics
from towers.two_tower import TwoTowerModel


def select_prior(
    model: TwoTowerModel, queries: EvalQueries, grid: tuple[float, ...], k: int, batch_users: int = 1024
) -> tuple[float, dict[str, dict[str, float]]]:
    """Validation Recall@``k`` and NDCG@``k`` for every weight in ``grid``; pick the best Recall@``k``.

    Args:
        model: the trained towers (eval mode).
        queries: validation queries (histories, targets, exclusions).
        grid: candidate weights (>= 0).
        k: the cut-off of the selection metric (``train.val_k``).
        batch_users: users per matrix product.

    Returns:
        (chosen weight, {str(weight): {"recall@k": ..., "ndcg@k": ...}}).
    """
    grid = tuple(sorted({float(b) for b in grid}))
    if not grid or min(grid) < 0:
        raise ValueError(f"train.popularity_prior_grid must be non-empty weights >= 0, got {grid}")
    if len(grid) == 1 or len(queries) == 0:
        return grid[0], {}
    from towers.evaluate import all_vectors, user_vectors

    n = model.shape.n_products
    with torch.no_grad():
        uvec = user_vectors(model, queries)
        pvec = all_vectors(model.product_vectors, n)
        ids = torch.arange(n)
        biases = torch.stack([model.product_offsets(ids, b) for b in grid])
    tops = topk_per_bias(uvec, pvec, queries.exclude, k, biases, batch_users)
    n_targets = np.diff(queries.targets[0])
    table: dict[str, dict[str, float]] = {}
    best, best_recall = grid[0], -1.0
    for b, top in zip(grid, tops, strict=True):
        met = ranking_metrics(hits_matrix(top, *queries.targets), n_targets, (k,), (k,))
        r = float(met[f"recall@{k}"].mean())
        table[str(b)] = {f"recall@{k}": round(r, 6), f"ndcg@{k}": round(float(met[f"ndcg@{k}"].mean()), 6)}
        if r > best_recall:
            best, best_recall = b, r
    return best, table
