"""LightningModule: the two-tower model plus losses, full-ranking validation and optimizers."""

from __future__ import annotations

import math

import numpy as np
import pytorch_lightning as pl
import torch

from towers.allocator import advise_huge_pages
from towers.bit_dropout import keep_mask
from towers.full_ranking import topk_excluding
from towers.history_horizon import hide_latest
from towers.losses import log_expected_count, sampled_softmax_loss, uniform_negatives
from towers.metrics import hits_matrix, ranking_metrics
from towers.shapes import TowerShape
from towers.sparse_grad_sync import average_sparse_grads, broadcast_tables, ddp_ignore_sparse_tables
from towers.tower_adam import TowerAdam
from towers.two_tower import TwoTowerModel

VAL_NDCG_KS = (10, 20)  # NDCG cut-offs of the validation metrics


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class TwoTowerLightning(pl.LightningModule):
    """Trains :class:`TwoTowerModel` on user→product, user→seller and product→seller tasks.

    Args:
        shape: tower sizes (dict form of :class:`TowerShape`, so checkpoints store it).
        train: the resolved ``train`` config section as a dict.
        model_extra: ``history_dropout``, ``history_horizon`` and other model-section values used in training only.
        val_ks: cut-offs reported during validation; ``train["val_k"]`` is the monitored one.
    """

    def __init__(self, shape: dict, train: dict, model_extra: dict, val_ks: tuple[int, ...] = (10, 20, 50)):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.tshape = TowerShape(**shape)
        self.train_cfg = train
        self.model = TwoTowerModel(self.tshape)
        # data-parallel fits average the id tables' sparse gradients themselves (towers.sparse_grad_sync)
        ddp_ignore_sparse_tables(self, self.model.sparse_parameters())
        self._synced_tables: list[torch.nn.Parameter] = []  # set by on_fit_start with several ranks
        self.register_buffer("product_logq", torch.full((self.tshape.n_products,), -math.log(max(self.tshape.n_products, 1))))
        self.register_buffer("seller_logq", torch.full((self.tshape.n_sellers,), -math.log(max(self.tshape.n_sellers, 1))))
        self.history_dropout = float(model_extra.get("history_dropout", 0.0))
        self.history_horizon = float(model_extra.get("history_horizon", 0.0))
        self.val_ks = tuple(sorted(set(val_ks) | {int(train["val_k"])}))
        self.val_queries = None  # EvalQueries, set by the data module
        self._gen = torch.Generator().manual_seed(int(train["seed"]))
        self._val_sums: dict[str, float] = {}
        self._val_n = 0
        self._epoch_sums: dict[str, torch.Tensor] = {}
        self._epoch_rows = 0
        # stored in every checkpoint: resume key, resolved config, vocab fingerprint (towers.train)
        self.run_info: dict = {}

    # ------------------------------------------------------------------ training
    def set_catalog(self, catalog) -> None:
        """Copy catalog features and sampling frequencies into the model's buffers."""
        with torch.no_grad():
            self.model.products.cats.copy_(catalog.product_cats)
            self.model.products.num.copy_(catalog.product_num)
            self.model.sellers.num.copy_(catalog.seller_num)
            self.product_logq.copy_(catalog.product_logq)
            self.model.set_popularity(catalog.product_logq)
            self.seller_logq.copy_(catalog.seller_logq)

    def _augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        b = dict(batch)
        p = float(self.train_cfg.get("user_id_dropout", 0.0))
        if p > 0:
            b["user_idx"] = b["user_idx"].masked_fill(~keep_mask(b["user_idx"].shape, p, self.device), 0)
        if self.history_horizon > 0:
            keep = hide_latest(b["hist_products"], self.history_horizon, self._gen)
            b["hist_products"] = b["hist_products"].masked_fill(~keep, 0)
            if "hist_sellers" in b:
                b["hist_sellers"] = b["hist_sellers"].masked_fill(~keep, 0)
        if self.history_dropout > 0:
            drop = ~keep_mask(b["hist_products"].shape, self.history_dropout, self.device)
            b["hist_products"] = b["hist_products"].masked_fill(drop, 0)
            if "hist_sellers" in b:
                b["hist_sellers"] = b["hist_sellers"].masked_fill(drop, 0)
        return b

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of the task losses for one batch. Returns (loss, per-task losses)."""
        cfg = self.train_cfg
        m = self.model
        temp = m.temperature
        weights = batch["weight"]
        rw = float(cfg.get("repeat_weight", 1.0))
        if rw != 1.0:
            # Positives already in the user's history (re-views, carts and purchases of a viewed item)
            # teach "score what I just saw", which serving never shows (seen items are excluded).
            repeat = (batch["hist_products"] == batch["product_idx"].unsqueeze(1)).any(1)
            weights = torch.where(repeat, weights * rw, weights)
        u = m.user_vectors(batch)
        pid = batch["product_idx"]
        M = int(cfg["num_negatives"])
        B = pid.shape[0]
        use_logq = bool(cfg["logq_correction"])
        hits = bool(cfg["remove_accidental_hits"])
        neg_ids = uniform_negatives(M, self.tshape.n_products, self._gen, self.device)
        # One pass through the product tower for positives and negatives: each lookup of a table
        # adds one more sparse gradient for autograd to concatenate (a copy of all before it).
        p, p_neg = m.product_vectors(torch.cat([pid, neg_ids])).split([B, len(neg_ids)])
        pc = nc = None
        if use_logq:
            pc = log_expected_count(self.product_logq[pid], B, len(neg_ids), self.tshape.n_products - 1)
            nc = log_expected_count(self.product_logq[neg_ids], B, len(neg_ids), self.tshape.n_products - 1)
        if self.tshape.item_bias:
            # The loss subtracts corrections from the logits: a bias enters as a negative one.
            bp, bn = m.products.bias(torch.cat([pid, neg_ids])).split([B, len(neg_ids)])
            pc, nc = (-bp, -bn) if pc is None else (pc - bp, nc - bn)
        parts = {
            "user_product": sampled_softmax_loss(
                u, p, pid, temp, p_neg, neg_ids, pc, nc, weights, hits
            )
        }
        tw = cfg["task_weights"]
        sid = batch["seller_idx"]
        valid = sid > 0
        if self.tshape.has_sellers and bool(valid.any()) and (tw.get("user_seller", 0) > 0 or tw.get("product_seller", 0) > 0):
            Ms = min(M, max(self.tshape.n_sellers - 1, 0))
            sneg = uniform_negatives(Ms, self.tshape.n_sellers, self._gen, self.device)
            s, sv = m.seller_vectors(torch.cat([sid, sneg])).split([B, len(sneg)])
            sc = snc = None
            if use_logq:
                sc = log_expected_count(self.seller_logq[sid], B, Ms, self.tshape.n_sellers - 1)
                snc = log_expected_count(self.seller_logq[sneg], B, Ms, self.tshape.n_sellers - 1)
            if tw.get("user_seller", 0) > 0:
                parts["user_seller"] = sampled_softmax_loss(u, s, sid, temp, sv, sneg, sc, snc, weights, hits, valid)
            if tw.get("product_seller", 0) > 0:
                # Which of the sellers does a buyer of this product choose: no popularity correction,
                # seller popularity is part of the answer here.
                parts["product_seller"] = sampled_softmax_loss(p, s, sid, temp, sv, sneg, None, None, weights, hits, valid)
        loss = sum(float(tw.get(k, 1.0)) * v for k, v in parts.items())
        l2 = float(cfg.get("embedding_l2", 0.0))
        if l2 > 0:
            reg = self.embedding_penalty(batch, neg_ids)
            parts["embedding_l2"] = reg
            loss = loss + l2 * reg
        return loss, parts

    def embedding_penalty(self, batch: dict[str, torch.Tensor], neg_ids: torch.Tensor) -> torch.Tensor:
        """Mean squared L2 norm of the id-embedding rows this batch touches (as in BPR-MF's
        regularisation): only those rows get a (sparse) gradient, so the penalty stays sparse-friendly.

        Args:
            batch: user_idx [B], product_idx [B], hist_products [B, L], seller_idx [B], hist_sellers [B, L].
            neg_ids: [M] sampled negative product indexes.
        Returns:
            scalar: the sum over the id tables of the mean squared row norm (index 0, padding, excluded).
        """
        m = self.model
        tables = [(m.products.id_emb, torch.cat([batch["product_idx"], neg_ids, batch["hist_products"].reshape(-1)]))]
        if self.tshape.has_sellers:
            sids = [batch["seller_idx"]] + ([batch["hist_sellers"].reshape(-1)] if "hist_sellers" in batch else [])
            tables.append((m.sellers.id_emb, torch.cat(sids)))
        if getattr(m.users, "id_emb", None) is not None:
            tables.append((m.users.id_emb, batch["user_idx"]))
        hp = m.users.product_ids
        if hp is not None and hp is not m.products.id_emb:  # separate history tables
            tables.append((hp, batch["hist_products"].reshape(-1)))
        hs = m.users.seller_ids
        if hs is not None and hs is not m.sellers.id_emb and "hist_sellers" in batch:
            tables.append((hs, batch["hist_sellers"].reshape(-1)))
        total = torch.zeros((), device=self.device)
        for table, idx in tables:
            idx = torch.unique(idx)
            idx = idx[idx > 0]
            if idx.numel():
                total = total + table(idx).pow(2).sum(-1).mean()
        return total

    def training_step(self, batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        """One optimizer step per batch: ``batch`` is a batch or a list of consecutive batches
        (``train.batches_per_call``, :class:`towers.batch_groups.BatchGroups`), stepped in order.

        Returns:
            the last batch's loss (detached).
        """
        batches = batch if isinstance(batch, list) else [batch]
        per_call = max(1, int(self.train_cfg.get("batches_per_call", 1)))
        opt = self.optimizers()
        for j, b in enumerate(batches):
            loss = self.train_batch(b, opt, batch_idx * per_call + j, self.manual_backward)
        # Lightning writes step metrics every log_every_n_steps of its own steps; self.log costs it
        # about 0.7 ms of bookkeeping (6% of a 1M-table CPU step), so it is called only then.
        loop = self.trainer.fit_loop.epoch_loop
        if (getattr(loop, "_batches_that_stepped", self.global_step) + 1) % max(1, int(self.trainer.log_every_n_steps)) == 0:
            self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(b["product_idx"]))
        return loss

    def train_batch(self, batch: dict[str, torch.Tensor], opt, batch_number: int, backward) -> torch.Tensor:
        """Loss, backward and optimizer step of one batch; adds it to the epoch sums.

        Args:
            batch: user_idx [B], product_idx [B], hist_products [B, L], ... (:meth:`compute_loss`).
            opt: the optimizer (Lightning's wrapper of :meth:`configure_optimizers`' in training).
            batch_number: the batch's index in the epoch, for the divergence error.
            backward: ``loss -> None``: ``self.manual_backward`` in training (a plain loop, as in
                ``benchmarks/bench_training.py``, passes ``torch.Tensor.backward``).
        Returns:
            the detached loss.
        """
        loss, parts = self.compute_loss(self._augment(batch))
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"training loss is {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_number}); lower train.lr_dense/lr_sparse or raise model.temperature"
            )
        opt.zero_grad()
        backward(loss)
        if self._synced_tables:
            average_sparse_grads(self._synced_tables)
        opt.step()
        # epoch means are accumulated here and logged once per epoch (on_train_epoch_end)
        bs = batch["product_idx"].shape[0]
        sums = self._epoch_sums
        loss = loss.detach()
        sums["loss"] = sums.get("loss", 0.0) + loss * bs
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.detach() * bs
        self._epoch_rows += bs
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["recsys"] = self.run_info

    def on_fit_start(self) -> None:
        # Data-parallel ranks draw their own negatives and dropout masks (rank 0 keeps the stream
        # of a single-process run). DDP leaves the id tables to this module: they start from rank
        # 0's values and their gradients are averaged in train_batch.
        if self.trainer.world_size > 1:
            seed = int(self.train_cfg["seed"]) + 1_000_003 * self.global_rank
            self._gen.manual_seed(seed)
            torch.manual_seed(seed)
            self._synced_tables = self.model.sparse_parameters()
            broadcast_tables(self._synced_tables)

    def on_train_epoch_start(self) -> None:
        self._epoch_sums: dict[str, torch.Tensor] = {}
        self._epoch_rows = 0

    def on_train_epoch_end(self) -> None:
        """Log the epoch's example-weighted mean losses: ``train/loss_epoch`` and ``train/<task>``."""
        n = max(self._epoch_rows, 1)
        for k, v in self._epoch_sums.items():
            name = "train/loss_epoch" if k == "loss" else f"train/{k}"
            self.log(name, v / n, on_step=False, on_epoch=True, prog_bar=k == "loss")

    def on_train_start(self) -> None:
        """Back the id tables and their optimizer moments by huge pages (``train.huge_pages``, CPU).

        Here, not at construction: Lightning has created the optimizers (and restored their state
        when resuming) by now, and no step has run yet.
        """
        if bool(self.train_cfg.get("huge_pages", False)) and self.device.type == "cpu":
            self.use_huge_pages([self.optimizers().optimizer])

    def use_huge_pages(self, optimizers: list[torch.optim.Optimizer]) -> int:
        """:func:`towers.allocator.advise_huge_pages` on the id tables and the optimizers' state
        tensors (the large ones: the moments of the id tables). Returns how many were marked."""
        tensors = [p.data for p in self.model.sparse_parameters()]
        for opt in optimizers:
            for state in opt.state.values():
                tensors += [v for v in state.values() if torch.is_tensor(v)]
        return advise_huge_pages(tensors)

    def configure_optimizers(self) -> TowerAdam:
        """One optimizer (:class:`towers.tower_adam.TowerAdam`): lazy row-sparse Adam on the id tables
        with sparse gradients, fused AdamW on the dense layers (and on every table when the towers
        are built without sparse gradients, at ``lr_sparse``)."""
        cfg = self.train_cfg
        sparse = self.model.sparse_parameters()
        dense = self.model.dense_parameters()
        lr_dense = float(cfg["lr_dense"]) if sparse else float(cfg["lr_sparse"])
        return TowerAdam(sparse, dense, lr_sparse=float(cfg["lr_sparse"]), lr_dense=lr_dense,
                         weight_decay=float(cfg["weight_decay"]))

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}
        self._val_n = 0
        ids = torch.arange(self.tshape.n_products, device=self.device)
        with torch.no_grad():
            self._item_vecs = torch.cat([self.model.product_vectors(c) for c in ids.split(65536)])
            self._item_offsets = self.model.product_offsets(ids)

    def validation_step(self, rows: torch.Tensor, batch_idx: int) -> None:
        q = self.val_queries
        if q is None:
            return
        r = rows.cpu().numpy()
        r = r[r >= 0]  # -1: padding of a data-parallel rank's share (TowerDataModule.val_dataloader)
        if len(r) == 0:
            return
        sub = q.subset(r)
        dev = self.device
        batch = {
            "user_idx": torch.from_numpy(sub.user_idx).to(dev),
            "hist_products": torch.from_numpy(sub.hist_products).to(dev),
            "hist_sellers": torch.from_numpy(sub.hist_sellers).to(dev),
            "hour": torch.from_numpy(sub.hour).to(dev),
            "dow": torch.from_numpy(sub.dow).to(dev),
        }
        with torch.no_grad():
            u = self.model.user_vectors(batch)
        K = max(self.val_ks)
        top, _ = topk_excluding(u, self._item_vecs, sub.exclude, K, item_bias=self._item_offsets)
        h = hits_matrix(top, *sub.targets)
        met = ranking_metrics(h, np.diff(sub.targets[0]), self.val_ks, VAL_NDCG_KS)
        for k, v in met.items():
            self._val_sums[k] = self._val_sums.get(k, 0.0) + float(v.sum())
        self._val_n += len(r)

    def on_validation_epoch_end(self) -> None:
        """Log the mean of every metric over all validation users (summed over data-parallel ranks)."""
        # every rank sums the same names, also a rank whose share had no users
        names = list(ranking_metrics(np.zeros((0, max(self.val_ks)), bool), np.zeros(0, np.int64), self.val_ks, VAL_NDCG_KS))
        sums = torch.tensor([self._val_sums.get(k, 0.0) for k in names] + [float(self._val_n)], dtype=torch.float64)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums.to(self.device), reduce_op="sum").cpu()
        *totals, n = sums.tolist()
        if n > 0:
            for k, v in zip(names, totals, strict=True):
                self.log(f"val/{k}", v / n, prog_bar=k == f"recall@{self.train_cfg['val_k']}")
        self._item_vecs = self._item_offsets = None
