"""LightningModule of the ranker: loss, optimizer and list-level validation (NDCG@10 vs retrieval)."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch

from ranking.losses import ranking_loss
from ranking.metrics import compare_orderings, graded_ndcg
from ranking.model import RankerModel, RankerShape


class RankerLightning(pl.LightningModule):
    """Trains :class:`RankerModel` on padded candidate lists.

    Args:
        shape: :class:`RankerShape` as a dict (so checkpoints store it).
        loss: ``listwise`` or ``pointwise`` (``ranking.loss``).
        lr, weight_decay: AdamW settings.
        n_candidates: N (retrieval list length) for validation.
        val_k: the cut-off of the validation metrics; ``val/graded_ndcg@k`` (graded gains from every
            labelled event, see :func:`ranking.metrics.graded_ndcg`) is the monitored one.
    """

    def __init__(self, shape: dict, loss: str = "listwise", lr: float = 1e-3, weight_decay: float = 1e-5,
                 n_candidates: int = 100, val_k: int = 10):
        super().__init__()
        self.save_hyperparameters()
        self.model = RankerModel(RankerShape.from_dict(shape))
        self.loss_name = loss
        self.lr = lr
        self.weight_decay = weight_decay
        self.n_candidates = n_candidates
        self.val_k = val_k
        self.val_data = None  # ranking.data.ListData, set by the trainer code
        self._val_scores: list[tuple[np.ndarray, np.ndarray]] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.model(batch)
        loss = ranking_loss(self.loss_name, logits, batch["label"], batch["mask"])
        if not torch.isfinite(loss):
            raise RuntimeError(f"ranker loss is {loss.item()} at step {self.global_step}; lower ranking.lr")
        # the epoch mean is logged once per epoch: each ``self.log`` call costs Lightning about 0.7 ms
        # of bookkeeping (the towers' module does the same, see benchmarks/bench_training.py)
        n = batch["label"].shape[0]
        self._loss_sum = self._loss_sum + loss.detach() * n
        self._loss_rows += n
        return loss

    def on_train_epoch_start(self) -> None:
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_rows = 0

    def on_train_epoch_end(self) -> None:
        """Log ``train/loss``, the epoch's example-weighted mean loss."""
        if self._loss_rows:
            self.log("train/loss", self._loss_sum / self._loss_rows, prog_bar=True, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------ validation

    def on_validation_epoch_start(self) -> None:
        self._val_scores = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        rows = batch["rows"].cpu().numpy()
        with torch.no_grad():
            logits = self.model(batch).float().cpu().numpy()
        self._val_scores.append((rows, logits))

    def on_validation_epoch_end(self) -> None:
        d = self.val_data
        if d is None or not self._val_scores:
            return
        scores = np.full(d.mask.shape, -np.inf, np.float32)
        for rows, logits in self._val_scores:
            scores[rows, : logits.shape[1]] = logits
        k = self.val_k
        graded = graded_ndcg(scores, d, self.n_candidates, k)
        if len(graded["ranker"]):
            self.log(f"val/graded_ndcg@{k}", float(graded["ranker"].mean()), prog_bar=True)
            self.log(f"val_retrieval/graded_ndcg@{k}", float(graded["retrieval"].mean()))
        res = compare_orderings(scores, d, self.n_candidates, (k,), (k,))
        if len(res["users"]) == 0:
            return
        for who in ("ranker", "retrieval"):
            prefix = "val" if who == "ranker" else "val_retrieval"
            for name, v in res[who].items():
                if name.startswith(("ndcg", "recall", "mrr")):
                    self.log(f"{prefix}/{name}", float(v.mean()))
        self._val_scores = []
