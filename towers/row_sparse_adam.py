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
        state = self.state[p]
        state.update(step=0, exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                     exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, values = _row_gradient(p.grad)
                if values.shape[0] == 0:
                    continue
                # a loaded state dict lacks the parameters its run never stepped
                state = self.state[p] or self._init_state(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m_rows = m.index_select(0, rows).lerp_(values, 1 - beta1)
                v_rows = v.index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
                m.index_copy_(0, rows, m_rows)
                v.index_copy_(0, rows, v_rows)
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                # gather, update, scatter: on a 1M-row table index_add_ took 3x as long as this
                p_rows = p.index_select(0, rows).add_(m_rows.div_(v_rows.sqrt_().add_(group["eps"])), alpha=-step_size)
                p.index_copy_(0, rows, p_rows)
        return loss


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
