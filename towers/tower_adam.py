"""One optimizer for the two-tower model: lazy row-sparse Adam on the id tables, fused AdamW on the rest."""

from __future__ import annotations

import torch
from torch.optim.adam import adam

from towers.row_sparse_adam import init_row_state, row_adam_step


class TowerAdam(torch.optim.Optimizer):
    """:class:`towers.row_sparse_adam.RowSparseAdam` for the tables with sparse gradients and
    ``torch.optim.AdamW(fused=True)`` for the dense layers, as one optimizer with two param groups.

    Why one: under manual optimisation Lightning counts every ``optimizer.step()`` as a training
    step, so two optimizers made ``trainer.global_step`` twice the number of batches (and
    ``train.checkpoint_every_n_steps`` half as many batches), and paid Lightning's step and
    ``zero_grad`` wrappers twice per batch.

    The numbers are those of the two optimizers it replaces (``tests/test_tower_adam.py`` checks them
    against ``RowSparseAdam`` and ``torch.optim.AdamW``); the group with ``rows=True`` holds the tables.

    Args:
        sparse: tables whose gradients are sparse (``nn.Embedding(sparse=True)``); lazy Adam, no decay.
        dense: the other parameters; AdamW with decoupled ``weight_decay``.
        lr_sparse, lr_dense: learning rates of the two groups.
        weight_decay: AdamW's decay of the dense group.
        betas, eps: Adam's, shared.
    """

    def __init__(self, sparse, dense, lr_sparse: float, lr_dense: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if min(lr_sparse, lr_dense, eps, weight_decay) < 0.0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid TowerAdam settings: lr_sparse={lr_sparse}, lr_dense={lr_dense}, "
                             f"weight_decay={weight_decay}, betas={betas}, eps={eps}")
        groups = []
        sparse, dense = list(sparse), list(dense)
        if sparse:
            groups.append({"params": sparse, "lr": lr_sparse, "weight_decay": 0.0, "rows": True})
        if dense:
            groups.append({"params": dense, "lr": lr_dense, "weight_decay": weight_decay, "rows": False})
        super().__init__(groups, {"betas": betas, "eps": eps})
        # The tables' moments exist from the start, so the caller can place them
        # (towers.allocator.advise_huge_pages) before training; a loaded state replaces them.
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, group["rows"])

    def _init_state(self, p: torch.Tensor, rows: bool) -> dict:
        state = self.state[p]
        if rows:
            return init_row_state(state, p)
        # the layout torch.optim.AdamW(fused=True) keeps: a float32 step tensor on the parameter's device
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            if not live:
                continue
            # a loaded state dict lacks the parameters its run never stepped
            states = [self.state[p] or self._init_state(p, group["rows"]) for p in live]
            if group["rows"]:
                for p, state in zip(live, states, strict=True):
                    row_adam_step(p, state, group["lr"], group["betas"], group["eps"])
                continue
            beta1, beta2 = group["betas"]
            # one fused kernel for all dense tensors: the per-tensor loop took 0.9 ms a step for three
            adam(
                live, [p.grad for p in live], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                [s["step"] for s in states], fused=True, decoupled_weight_decay=True, amsgrad=False,
                beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=False,
            )
        return loss
