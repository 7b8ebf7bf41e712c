"""Sampled softmax with in-batch plus uniform (mixed) negatives, logQ correction and hit removal."""

from __future__ import annotations

import torch

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

    With ``remove_accidental_hits`` the in-batch candidates are merged by id: an id that is the
    positive of c rows becomes one column whose logit is raised by log c (c equal terms of the
    softmax denominator), except in those rows' own loss, where its other copies are accidental
    hits and only the row's own copy counts. This is the same loss and the same gradients as c
    masked columns (``tests/test_towers.py``) with fewer columns: popular items repeat within a
    batch. It needs what every tower gives: ``pos`` and ``pos_correction`` are functions of
    ``pos_ids`` (rows with one id have one vector).

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
    rows = torch.arange(B, device=query.device)
    if remove_accidental_hits:
        uniq, inv = torch.unique(pos_ids, return_inverse=True)
        first = torch.full(uniq.shape, B, dtype=torch.long, device=query.device).scatter_reduce_(0, inv, rows, "amin")
        members = torch.ones(B, device=query.device) if valid is None else valid.to(query.dtype)
        count = torch.zeros(uniq.shape[0], device=query.device).index_add_(0, inv, members)
        log_count = count.clamp_min(1).log()
        in_batch, target = pos[first], inv
        # Columns without a valid row must not act as candidates; the others count c times.
        col_shift = torch.where(count > 0, log_count, torch.full_like(count, _MASK))
        if pos_correction is not None:
            col_shift = col_shift - pos_correction[first]
    else:
        in_batch, target = pos, rows
        col_shift = None if pos_correction is None else -pos_correction
        if valid is not None:
            mask = torch.zeros(B, device=query.device).masked_fill_(~valid, _MASK)
            col_shift = mask if col_shift is None else col_shift + mask
    cands = torch.cat([in_batch, neg]) if has_neg else in_batch
    C = in_batch.shape[0]
    if has_neg and neg_correction is not None:
        base = col_shift if col_shift is not None else torch.zeros(C, device=query.device)
        col_shift = torch.cat([base, -neg_correction])
    elif has_neg and col_shift is not None:
        col_shift = torch.cat([col_shift, torch.zeros(cands.shape[0] - C, device=query.device)])
    edits = None
    if remove_accidental_hits:
        # the row's own column: one copy of its positive (log c undone; masked-invalid stays masked)
        er, ec, ev = [rows], [inv], [-log_count[inv]]
        if has_neg and neg_ids is not None:
            r, c = _hits(pos_ids, neg_ids)
            er.append(r)
            ec.append(C + c)
            ev.append(torch.full(r.shape, _MASK, device=query.device))
        edits = (torch.cat(er), torch.cat(ec), torch.cat(ev))
    w = weights.float() if weights is not None else torch.ones(B, device=query.device)
    if valid is not None:
        w = w * valid.float()
    w = (w / w.sum().clamp_min(1e-8)).detach()
    return _SoftmaxCrossEntropy.apply(query / temperature, cands, col_shift, target, edits, w)


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """``sum_i w_i * CE(q_i . cands + col_shift + edits, target_i)`` with its [B, C] logit matrix
    kept inside.

    The logits are a training step's largest tensor, and each pass over them is memory bound:
    autograd through matmul, in-place shifts, indexed edits and ``cross_entropy`` made about a dozen
    passes (copies for the indexed edits' backward, zeros for the NLL's). Here the forward is the
    matrix product, one shift, the sparse edits and a log-sum-exp that leaves exp(logit - row max)
    in the buffer; the backward scales that into the softmax gradient in place and multiplies it back.
    """

    @staticmethod
    def forward(ctx, q, cands, col_shift, target, edits, w):
        """Args:
            q: [B, d] queries (already divided by the temperature).
            cands: [C, d] candidates.
            col_shift: [C] added to every row's logits (corrections, log counts, masks), or None.
            target: [B] int64 column of each row's positive.
            edits: (rows [E], cols [E], values [E]) added at single positions, or None.
            w: [B] row weights (summing to 1 over the rows that count).
        Returns:
            scalar loss.
        """
        x = (q @ cands.T).float()
        if col_shift is not None:
            x.add_(col_shift.unsqueeze(0))
        if edits is not None:
            x.index_put_((edits[0], edits[1]), edits[2].to(x.dtype), accumulate=True)
        # log-sum-exp by hand, keeping exp(x - max) for the backward: torch.logsumexp made its own
        # passes (max with indices, a copy) and the backward had to exponentiate again
        top = x.amax(1, keepdim=True)
        picked = x.gather(1, target.unsqueeze(1)).squeeze(1)
        e = x.sub_(top).exp_()
        total = e.sum(1)
        lse = top.squeeze(1) + total.log()
        ctx.save_for_backward(q, cands, e, total, target, w)
        return ((lse - picked) * w).sum()

    @staticmethod
    def backward(ctx, grad):
        if getattr(ctx, "used", False):
            # the first backward overwrote the saved logits with the softmax gradient
            raise RuntimeError("sampled_softmax_loss supports one backward per forward; recompute the loss")
        ctx.used = True
        q, cands, e, total, target, w = ctx.saved_tensors
        g = w * grad
        # softmax(x) * g - onehot(target) * g, written over e = exp(x - max) (not needed after this)
        p = e.mul_((g / total).unsqueeze(1))
        p.scatter_add_(1, target.unsqueeze(1), -g.unsqueeze(1))
        pg = p.to(q.dtype)
        grad_q = pg @ cands if ctx.needs_input_grad[0] else None
        grad_c = pg.T @ q if ctx.needs_input_grad[1] else None
        grad_shift = p.sum(0) if ctx.needs_input_grad[2] else None
        return grad_q, grad_c, grad_shift, None, None, None


def _hits(pos_ids: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (row, candidate) pair with ``pos_ids[row] == ids[candidate]``.

    Args:
        pos_ids: [B] the rows' positive ids.
        ids: [C] candidate ids.
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
    return rows, order[within]


def uniform_negatives(n: int, n_items: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """``n`` ids drawn uniformly from 1..n_items-1 (0 is the unknown row). Returns [n] int64."""
    if n_items <= 1 or n <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    ids = torch.randint(1, n_items, (n,), generator=generator)
    return ids.to(device)


__all__ = ["log_expected_count", "sampled_softmax_loss", "uniform_negatives"]
