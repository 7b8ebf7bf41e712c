"""Sampled softmax with in-batch plus uniform (mixed) negatives, logQ correction and hit removal."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MASK = -1e9


def log_expected_count(logq: torch.Tensor, batch_size: int, n_uniform: int, n_items: int) -> torch.Tensor:
    """Log of how often each candidate is expected among a batch's candidates.

    In-batch candidates are drawn in proportion to item frequency q (``batch_size`` draws) and the
    shared negatives uniformly (``n_uniform`` draws over ``n_items``), so the expected count of item
    j is ``B q_j + M / N`` (mixed negative sampling, Yang et al. 2020; logQ, Yi et al. 2019).

    Args:
        logq: [...] log frequency probability of each candidate.
    Returns:
        [...] log expected counts, subtracted from the logits.
    """
    uniform = n_uniform / max(n_items, 1)
    return torch.log(batch_size * logq.exp() + uniform)


def sampled_softmax_loss(
    query: torch.Tensor,
    pos: torch.Tensor,
    pos_ids: torch.Tensor,
    temperature: torch.Tensor | float,
    neg: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
    pos_correction: torch.Tensor | None = None,
    neg_correction: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    remove_accidental_hits: bool = True,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted softmax cross-entropy of each query against its positive and all candidates.

    Candidates are the batch's positives (in-batch negatives) and ``neg`` (shared uniform
    negatives). Each candidate's logit is reduced by its correction (see
    :func:`log_expected_count`), and candidates equal to the row's positive are masked
    (accidental hits), so a popular item is not pushed away from users who like it.

    Args:
        query: [B, d] unit vectors.
        pos: [B, d] unit vectors of the positives.
        pos_ids: [B] ids of the positives.
        temperature: scalar.
        neg: [M, d] unit vectors of uniform negatives, or None.
        neg_ids: [M] ids of the negatives.
        pos_correction: [B] logit correction of each in-batch candidate, or None.
        neg_correction: [M] logit correction of each uniform negative, or None.
        weights: [B] example weights, or None.
        remove_accidental_hits: mask candidates whose id equals the row's positive id.
        valid: [B] bool, rows that take part (e.g. examples with a known seller), or None.

    Returns:
        Scalar loss (weighted mean over valid rows).
    """
    B = query.shape[0]
    has_neg = neg is not None and neg.shape[0] > 0
    # One [B, B + M] matrix, built with as few passes over it as possible: the temperature scales
    # the [B, d] queries (not the logits), candidates are concatenated before the product, and the
    # corrections and masks are applied in place. This is the hot path of a CPU training step.
    cands = torch.cat([pos, neg]) if has_neg else pos
    logits = (query / temperature) @ cands.T
    if pos_correction is not None:
        corr = torch.cat([pos_correction, neg_correction]) if has_neg and neg_correction is not None else pos_correction
        if corr.shape[0] == logits.shape[1]:
            logits.sub_(corr.unsqueeze(0))
        else:  # corrections for the in-batch part only
            logits[:, :B].sub_(corr.unsqueeze(0))
    elif has_neg and neg_correction is not None:
        logits[:, B:].sub_(neg_correction.unsqueeze(0))
    # Masks are applied by index, not as a [B, B + M] boolean matrix: hits are rare, and building
    # and applying the dense mask took 13% of a default CPU training step.
    if remove_accidental_hits:
        ids = torch.cat([pos_ids, neg_ids]) if has_neg and neg_ids is not None else pos_ids
        rows, cols = _hits(pos_ids, ids)
        logits[rows, cols] = _MASK
    if valid is not None:
        # Rows that do not take part must not act as candidates either (their own row is
        # excluded from the loss by its zero weight below). A [B, B] fill: no host sync on a GPU.
        logits[:, :B].masked_fill_(~valid.unsqueeze(0), _MASK)
    target = torch.arange(B, device=query.device)
    loss = F.cross_entropy(logits.float(), target, reduction="none")
    w = weights.float() if weights is not None else torch.ones_like(loss)
    if valid is not None:
        w = w * valid.float()
    return (loss * w).sum() / w.sum().clamp_min(1e-8)


def _hits(pos_ids: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (row, candidate) pair with ``pos_ids[row] == ids[candidate]``, but each row's own positive (candidate = row).

    Args:
        pos_ids: [B] the rows' positive ids (also candidates 0..B-1).
        ids: [C] all candidate ids, C >= B.
    Returns:
        ``(rows, cols)``, two [H] int64 index tensors.
    """
    B = pos_ids.shape[0]
    sorted_ids, order = torch.sort(ids)
    lo = torch.searchsorted(sorted_ids, pos_ids)
    counts = torch.searchsorted(sorted_ids, pos_ids, right=True) - lo
    rows = torch.repeat_interleave(torch.arange(B, device=ids.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    within = torch.arange(rows.shape[0], device=ids.device) - torch.repeat_interleave(starts - lo, counts)
    cols = order[within]
    keep = cols != rows
    return rows[keep], cols[keep]


def uniform_negatives(n: int, n_items: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """``n`` ids drawn uniformly from 1..n_items-1 (0 is the unknown row). Returns [n] int64."""
    if n_items <= 1 or n <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    ids = torch.randint(1, n_items, (n,), generator=generator)
    return ids.to(device)


__all__ = ["log_expected_count", "sampled_softmax_loss", "uniform_negatives"]
