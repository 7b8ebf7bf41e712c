"""Training-time horizon augmentation: hide the latest items of a history so the target lies further ahead."""

from __future__ import annotations

import torch


def hide_latest(hist: torch.Tensor, horizon: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask of the history entries to keep after hiding a random number of the latest ones.

    A causal example pairs the items before a target with the target: the next step. When the items
    to predict lie several steps past the history (a held-out block after the user's sequence), the
    recency profile learned from next-step examples is too steep. Hiding the latest
    ``floor(u * horizon * n)`` of the ``n`` items (u uniform in [0, 1], per row, at least one item
    kept) trains on targets up to ``horizon * n`` steps ahead.

    Args:
        hist: [B, L] int64 history ids, oldest first, left-aligned, 0 = padding.
        horizon: the largest hidden share of a history, in [0, 1).
        generator: random generator (CPU), for reproducible runs.

    Returns:
        [B, L] bool, True where the entry stays visible (padding stays False).
    """
    if not 0 <= horizon < 1:
        raise ValueError(f"model.history_horizon must be in [0, 1), got {horizon}")
    present = hist > 0
    if horizon == 0 or hist.shape[1] == 0:
        return present
    n = present.sum(1)
    u = torch.rand(n.shape, generator=generator).to(hist.device)
    hidden = torch.minimum(torch.floor(u * horizon * n.float()).long(), (n - 1).clamp_min(0))
    slots = torch.arange(1, hist.shape[1] + 1, device=hist.device).unsqueeze(0)
    # Left-aligned: the visible entries are the first n - hidden slots.
    return present & (slots <= (n - hidden).unsqueeze(1))
