"""Ranking losses over padded candidate lists: logits, labels and mask are [B, C].

Labels are graded relevance weights (``ranking.label_weights``: purchase > cart > view, 0 = no
interaction); padded slots have ``mask`` False and never contribute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("listwise", "pointwise")


def pointwise_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weighted binary cross-entropy: target 1 for any labelled row, weighted by its label weight.

    Unlabelled rows have target 0 and weight 1. Returns the weighted mean over valid rows.
    """
    logits = logits.float()
    labels = labels.float()
    m = mask.float()
    y = (labels > 0).float()
    w = torch.where(labels > 0, labels, torch.ones_like(labels)) * m
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return (w * bce).sum() / w.sum().clamp_min(1e-12)


def listwise_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of each list against its label-weighted target distribution.

    The target of row i is ``label_i / sum(labels)``; lists without any labelled row are skipped.
    Returns the mean over lists that have labels (0 when none has).
    """
    logits = logits.float()
    labels = labels.float() * mask.float()
    masked = logits.masked_fill(~mask, -1e9)
    logp = torch.log_softmax(masked, dim=-1)
    total = labels.sum(-1)
    has = total > 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    target = labels[has] / total[has].unsqueeze(-1)
    return -(target * logp[has]).sum(-1).mean()


def ranking_loss(name: str, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The loss named by ``ranking.loss``."""
    if name == "listwise":
        return listwise_loss(logits, labels, mask)
    if name == "pointwise":
        return pointwise_loss(logits, labels, mask)
    raise ValueError(f"ranking.loss must be one of {', '.join(LOSSES)}, got {name!r}")
