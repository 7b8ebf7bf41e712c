"""Lazy Adam for embedding tables with sparse gradients, updating only the rows a step touched."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from towers.embeddings import sorted_groups


class RowSparseAdam(torch.optim.Optimizer):
    """The update of :class:`torch.optim.SparseAdam`, computed on the touched rows only.

    ``SparseAdam`` builds sparse tensors for every intermediate and adds them into the dense
    moment tables (``sparse_mask``, then a sparse + dense add per moment and for the weights); on a
    1M-row table that bookkeeping was most of a CPU training step's optimizer time. Here the
    gradient's rows are summed once per distinct id, and the moments and weights of those rows are
    gathered, updated and scattered back: the same numbers
    (``tests/test_row_sparse_adam.py`` checks them against ``SparseAdam``) with fewer passes.

    As in ``SparseAdam``, the moments of rows a step does not touch are left as they are ("lazy"
    Adam) and the bias correction uses the number of steps taken, shared by all rows.

    Args:
        params: tensors whose ``.grad`` is a sparse COO tensor (``nn.Embedding(sparse=True)``) or
            dense (then every row counts as touched).
        lr, betas, eps: as in ``torch.optim.SparseAdam``.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if lr < 0.0 or eps < 0.0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid RowSparseAdam settings: lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        # The moments exist from the start (not at the first step), so the caller can place them
        # (towers.allocator.advise_huge_pages) before training; a loaded state replaces them.
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> dict:
        return init_row_state(self.state[p], p)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    # a loaded state dict lacks the parameters its run never stepped
                    row_adam_step(p, self.state[p] or self._init_state(p), group["lr"], group["betas"], group["eps"])
        return loss


def init_row_state(state: dict, p: torch.Tensor) -> dict:
    """Fill ``state`` with step 0 and zero moments for the table ``p`` (both moments in one [N, 2, ...] table)."""
    state["step"] = 0
    _share_rows(state, torch.zeros((p.shape[0], 2, *p.shape[1:]), dtype=p.dtype, device=p.device))
    return state


def row_adam_step(p: torch.Tensor, state: dict, lr: float, betas: tuple[float, float], eps: float) -> None:
    """One lazy Adam step of the rows of ``p`` that its gradient touches (see :class:`RowSparseAdam`).

    Called from the optimizers' ``step``, which already runs under ``torch.no_grad()``: a grad-mode
    switch per table per step would only repeat it.

    Args:
        p: a table [N, ...] whose ``.grad`` is sparse COO (possibly uncoalesced) or dense.
        state: its state (:func:`init_row_state`, or a loaded ``SparseAdam``/``RowSparseAdam`` state).
        lr, betas, eps: Adam's settings.
    """
    beta1, beta2 = betas
    rows, values = _row_gradient(p.grad)
    if values.shape[0] == 0:
        return
    state["step"] += 1
    t = state["step"]
    moments = _moments(state)
    both = moments.index_select(0, rows)  # [U, 2, ...]: each row's two moments side by side
    m_rows = both[:, 0].lerp_(values, 1 - beta1)
    v_rows = both[:, 1].mul_(beta2).addcmul_(values, values, value=1 - beta2)
    moments.index_copy_(0, rows, both)
    step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
    # Rows whose gradients were all zero so far (examples of weight 0) have v = 0, and the
    # square root of an exact 0 took 8x as long as of other numbers here. Raised to the
    # smallest normal float, their root (1e-19) still vanishes next to eps: the same denom.
    denom = v_rows.clamp_min(torch.finfo(v_rows.dtype).tiny).sqrt_().add_(eps)
    # gather, update, scatter: on a 1M-row table index_add_ took 3x as long as this
    p_rows = p.index_select(0, rows).addcdiv_(m_rows, denom, value=-step_size)
    p.index_copy_(0, rows, p_rows)


def _share_rows(state: dict, moments: torch.Tensor) -> torch.Tensor:
    """Keep both Adam moments in one [N, 2, ...] table (``exp_avg`` and ``exp_avg_sq`` are views of it).

    A step gathers and scatters the touched rows of the moments: side by side, a row's two
    moments are one contiguous block, one random memory access instead of two.
    """
    state.update(moments=moments, exp_avg=moments[:, 0], exp_avg_sq=moments[:, 1])
    return moments


def _moments(state: dict) -> torch.Tensor:
    """The state's shared moment table, rebuilt from separate ``exp_avg`` / ``exp_avg_sq`` tensors
    (a ``torch.optim.SparseAdam`` checkpoint, or a load that copied the views apart)."""
    moments = state.get("moments")
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if moments is not None and m.data_ptr() == moments.data_ptr() and v.data_ptr() == moments[:, 1].data_ptr():
        return moments
    return _share_rows(state, torch.stack([m, v], 1))


def _row_gradient(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient as (distinct row ids [U], summed rows [U, ...]).

    Args:
        grad: a sparse COO gradient (possibly uncoalesced: several lookups of one table add up
            their pieces) or a dense one.
    """
    if not grad.is_sparse:
        return torch.arange(grad.shape[0], device=grad.device), grad
    if grad.is_coalesced():
        return grad._indices()[0], grad._values()
    idx, values = grad._indices()[0], grad._values()
    rows, order, _, starts = sorted_groups(idx)
    # sums of the pieces of each row, grouped by the sort: half the time of index_add_ here
    flat = values.reshape(values.shape[0], -1)
    summed = F.embedding_bag(order, flat, starts, mode="sum")
    return rows, summed.reshape((rows.shape[0],) + values.shape[1:])
