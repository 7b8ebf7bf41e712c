"""Towers, loss and training on a tiny prepared artifact with planted clusters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys.config import load_config
from towers.losses import log_expected_count, sampled_softmax_loss, uniform_negatives
from towers.metrics import hits_matrix, ranking_metrics
from towers.shapes import TowerShape
from towers.two_tower import TwoTowerModel


def test_loss_matches_hand_computed_softmax() -> None:
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    ids = torch.tensor([1, 2, 3, 4])
    got = sampled_softmax_loss(q, p, ids, 0.5, remove_accidental_hits=False)
    want = torch.nn.functional.cross_entropy(q @ p.T / 0.5, torch.arange(4))
    assert torch.allclose(got, want, atol=1e-6)


def test_accidental_hits_are_masked() -> None:
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    p[1] = p[0]  # a tower gives one vector per id
    ids = torch.tensor([7, 7, 9])  # rows 0 and 1 share a positive: neither is the other's negative
    masked = sampled_softmax_loss(q, p, ids, 1.0)
    logits = q @ p.T
    logits[0, 1] = logits[1, 0] = -1e9
    want = torch.nn.functional.cross_entropy(logits, torch.arange(3))
    assert torch.allclose(masked, want, atol=1e-6)
    neg = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    with_neg = sampled_softmax_loss(q, p, ids, 1.0, neg, torch.tensor([9, 5]))
    # Row 2's positive (9) appears among the negatives and must be masked there.
    l2 = torch.cat([logits, q @ neg.T], 1)
    l2[2, 3] = -1e9
    l2[0, 3] = l2[0, 3]
    assert torch.allclose(with_neg, torch.nn.functional.cross_entropy(l2, torch.arange(3)), atol=1e-6)


def test_logq_correction_is_expected_count() -> None:
    logq = torch.log(torch.tensor([0.5, 0.25]))
    c = log_expected_count(logq, batch_size=10, n_uniform=100, n_items=1000)
    assert torch.allclose(c, torch.log(torch.tensor([5.0 + 0.1, 2.5 + 0.1])))


def test_metrics_known_answer() -> None:
    top = np.array([[3, 1, 2], [5, 6, 7]])
    indptr, idx = np.array([0, 2, 3]), np.array([1, 2, 9])
    h = hits_matrix(top, indptr, idx)
    assert h.tolist() == [[False, True, True], [False, False, False]]
    m = ranking_metrics(h, np.array([2, 1]), (2, 3), (3,))
    assert m["recall@2"].tolist() == [0.5, 0.0] and m["recall@3"].tolist() == [1.0, 0.0]
    idcg = 1 + 1 / math.log2(3)
    assert m["ndcg@3"][0] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / idcg)
    assert m["mrr"].tolist() == [0.5, 0.0]


def test_unseen_user_gets_vector_from_history() -> None:
    shape = TowerShape(n_users=5, n_products=20, n_sellers=4, n_categories=1, n_brands=1, n_product_features=0,
                       n_seller_features=0, dim=8)
    m = TwoTowerModel(shape).eval()
    b = {"user_idx": torch.tensor([0, 0]), "hist_products": torch.tensor([[1, 2, 0], [5, 6, 7]]),
         "hist_sellers": torch.zeros(2, 3, dtype=torch.long), "hour": torch.tensor([-1, 3]), "dow": torch.tensor([-1, 2])}
    u = m.user_vectors(b)
    assert u.shape == (2, 8) and torch.allclose(u.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(u[0], u[1])


def test_separate_history_tables() -> None:
    """model.separate_history: the history reads its own sparse tables, not the candidate towers' ids."""
    kw = dict(n_users=5, n_products=20, n_sellers=4, n_categories=1, n_brands=1, n_product_features=0,
              n_seller_features=0, dim=8)
    shared, sep = TwoTowerModel(TowerShape(**kw)), TwoTowerModel(TowerShape(**kw, separate_history=True))
    assert shared.users.product_ids is shared.products.id_emb
    assert sep.users.product_ids is not sep.products.id_emb and sep.users.seller_ids is not sep.sellers.id_emb
    assert len(sep.sparse_parameters()) == len(shared.sparse_parameters()) + 2
    b = {"user_idx": torch.tensor([1, 2]), "hist_products": torch.tensor([[1, 2, 0], [5, 6, 7]]),
         "hist_sellers": torch.tensor([[1, 0, 0], [2, 2, 3]])}
    (sep.user_vectors(b) * sep.product_vectors(torch.tensor([3, 4]))).sum().backward()
    assert sep.users.product_ids.weight.grad is not None and sep.products.id_emb.weight.grad is not None
    sep.eval()
    with torch.no_grad():  # the candidate id table no longer moves the user vector
        before = sep.user_vectors(b)
        sep.products.id_emb.weight.add_(1.0)
        assert torch.allclose(sep.user_vectors(b), before)


@pytest.mark.parametrize("neighbors", [0, 5])
def test_training_learns_planted_clusters(tmp_path, neighbors: int) -> None:
    from tests.tiny_prepared import write_tiny_prepared
    from towers import evaluate, train

    prep = write_tiny_prepared(tmp_path / "prep")
    cfg = load_config(None, ["train.epochs=6", "train.batch_size=128", "train.num_negatives=32", "data.max_history=20",
                             "train.val_k=10", "eval.baselines=[popularity]", "train.early_stopping_patience=10",
                             f"model.item_neighbors={neighbors}"])
    summary = train.run(cfg, prep, tmp_path / "run", resume=False, progress=False)
    assert summary["epochs"] >= 1
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "towers" / "metrics.csv")))
    epoch_rows = [r for r in rows if r.get("train/loss_epoch")]
    # one epoch-mean row per epoch, with every task's mean; step losses every log_every_n_steps
    assert len(epoch_rows) == summary["epochs"] and all(r.get("train/user_product") for r in epoch_rows)
    assert all(0 < float(r["train/loss_epoch"]) < 20 for r in epoch_rows)
    report = evaluate.run(cfg, tmp_path / "run")
    tt = report["models"]["two_tower"]["products"]
    pop = report["models"]["popularity"]["products"]
    # 20 products per cluster, 10 seen: chance recall@10 is ~10/110; the clusters make it reachable.
    assert tt["recall@10"] > 0.8 > pop["recall@10"] * 3
    assert report["models"]["two_tower"]["sellers"]["recall@10"] > 0.9
    if not neighbors:
        _check_tracking(summary, cfg)
    if neighbors:
        from towers.checkpoint import load_towers
        from towers.item_neighbors import neighbors_from_examples

        model, _ = load_towers(tmp_path / "run" / "model")
        want = neighbors_from_examples(prep, ["train"], model.shape.n_products, neighbors, cfg.train.seed)
        assert (want > 0).any() and np.array_equal(model.products.neighbors.numpy(), want)


def _check_tracking(summary: dict, cfg) -> None:
    """The MLflow run of a training + evaluation: config params, per-epoch metrics, the model and the
    evaluation report as artifacts, the registered model behind the ``champion`` alias."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    run_id = summary["mlflow_run_id"]
    params = client.get_run(run_id).data.params
    assert params["train.lr_sparse"] == str(cfg.train.lr_sparse) and params["model.dim"] == str(cfg.model.dim)
    assert len(client.get_metric_history(run_id, "val/recall10")) == summary["epochs"]  # MLflow drops the "@"
    assert len(client.get_metric_history(run_id, "train/loss_epoch")) == summary["epochs"]
    assert client.get_metric_history(run_id, "test_products_recall_at_10")
    towers = {a.path for a in client.list_artifacts(run_id, "towers")}
    assert {"towers/towers.pt", "towers/model.json"} <= towers
    assert "eval/report.json" in {a.path for a in client.list_artifacts(run_id, "eval")}
    mv = client.get_model_version_by_alias(f"{cfg.train.experiment}-two-tower", "champion")
    assert mv.run_id == run_id


def _reference_loss(q, p, pid, t, neg, nid, pc, nc, w, valid):
    """The loss written out naively: logits, corrections, masks, weighted cross-entropy."""
    logits = torch.cat([q @ p.T, q @ neg.T], 1) / t - torch.cat([pc, nc]).unsqueeze(0)
    ids = torch.cat([pid, nid])
    B = len(q)
    for i in range(B):
        for j in range(logits.shape[1]):
            if j != i and (ids[j] == pid[i] or (j < B and not valid[j])):
                logits[i, j] = -1e9
    per_row = torch.nn.functional.cross_entropy(logits, torch.arange(B), reduction="none")
    ww = w * valid.float()
    return (per_row * ww).sum() / ww.sum()


def test_loss_with_negatives_corrections_and_invalid_rows_matches_reference() -> None:
    g = torch.Generator().manual_seed(3)
    q, p, neg = (torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1) for n in (6, 6, 5))
    pid, nid = torch.tensor([1, 2, 2, 3, 4, 5]), torch.tensor([5, 6, 1, 7, 8])
    pc, nc, w = torch.randn(6, generator=g), torch.randn(5, generator=g), torch.rand(6, generator=g)
    valid = torch.tensor([True, True, False, True, True, True])
    got = sampled_softmax_loss(q, p, pid, 0.2, neg, nid, pc, nc, w, True, valid)
    assert torch.allclose(got, _reference_loss(q, p, pid, 0.2, neg, nid, pc, nc, w, valid), atol=1e-5)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_loss_and_gradients_match_reference_with_many_hits(seed: int) -> None:
    # Few distinct ids: most in-batch candidates repeat (merged into one column with a log-count
    # shift) and many negatives collide with some row's positive (masked by index). The positives'
    # vectors and corrections come from per-id tables, as from a tower.
    g = torch.Generator().manual_seed(seed)
    q, neg = (torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1).requires_grad_() for n in (12, 9))
    table = torch.randn(6, 4, generator=g).requires_grad_()
    id_corr = torch.randn(6, generator=g).requires_grad_()  # learned, as with model.item_bias
    pid, nid = torch.randint(1, 5, (12,), generator=g), torch.randint(1, 5, (9,), generator=g)
    nc, w = torch.randn(9, generator=g).requires_grad_(), torch.rand(12, generator=g)
    valid = torch.rand(12, generator=g) > 0.25
    valid[pid == pid[0]] = False  # an id none of whose rows is valid: its column is masked for everyone
    p = torch.nn.functional.normalize(table[pid], dim=-1)
    got = sampled_softmax_loss(q, p, pid, 0.2, neg, nid, id_corr[pid], nc, w, True, valid)
    want = _reference_loss(q, p, pid, 0.2, neg, nid, id_corr[pid], nc, w, valid)
    assert torch.allclose(got, want, atol=1e-5)
    inputs = (q, table, neg, id_corr, nc)
    grads = torch.autograd.grad(got, inputs, retain_graph=True)  # p is shared with the reference
    for a, b in zip(grads, torch.autograd.grad(want, inputs, retain_graph=True), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # without validity: the plain merged-duplicates case
    all_rows = torch.ones(12, dtype=torch.bool)
    got = sampled_softmax_loss(q, p, pid, 0.2, neg, nid, id_corr[pid], nc, w, True)
    assert torch.allclose(got, _reference_loss(q, p, pid, 0.2, neg, nid, id_corr[pid], nc, w, all_rows), atol=1e-5)



def test_loss_and_gradients_stay_exact_with_huge_logits() -> None:
    # temperature 0.002: logits up to +-500, where exp overflows without the row-max shift
    g = torch.Generator().manual_seed(11)
    q, p = (torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=-1).requires_grad_() for _ in range(2))
    pid = torch.arange(1, 9)
    got = sampled_softmax_loss(q, p, pid, 0.002)
    want = torch.nn.functional.cross_entropy(q @ p.T / 0.002, torch.arange(8))
    assert torch.isfinite(got) and torch.allclose(got, want, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (q, p)), torch.autograd.grad(want, (q, p)), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)

def test_repeat_positives_are_reweighted() -> None:
    from recsys.config import Config, to_dict
    from towers.lit_module import TwoTowerLightning

    shape = TowerShape(n_users=10, n_products=30, n_sellers=1, n_categories=1, n_brands=1, n_product_features=0,
                       n_seller_features=0, dim=8)
    batch = {"user_idx": torch.tensor([1, 2, 3]), "product_idx": torch.tensor([5, 6, 7]),
             "seller_idx": torch.zeros(3, dtype=torch.long), "weight": torch.tensor([1.0, 2.0, 1.0]),
             "hist_products": torch.tensor([[4, 5, 0], [1, 2, 3], [7, 0, 0]]),  # rows 0 and 2 are repeats
             "hist_sellers": torch.zeros(3, 3, dtype=torch.long), "hour": torch.full((3,), -1), "dow": torch.full((3,), -1)}

    def loss(repeat_weight: float, weight: torch.Tensor) -> torch.Tensor:
        train = {**to_dict(Config().train), "repeat_weight": repeat_weight, "num_negatives": 8}
        torch.manual_seed(0)
        lit = TwoTowerLightning(shape.to_dict(), train, {}).eval()
        lit._gen.manual_seed(0)
        return lit.compute_loss({**batch, "weight": weight})[0]

    only_new = loss(1.0, torch.tensor([0.0, 2.0, 0.0]))
    assert torch.allclose(loss(0.0, batch["weight"]), only_new)
    assert not torch.allclose(loss(1.0, batch["weight"]), only_new)
    assert torch.allclose(loss(0.5, batch["weight"]), loss(1.0, torch.tensor([0.5, 2.0, 0.5])))


def test_embedding_l2_penalises_only_the_rows_a_batch_touches() -> None:
    from recsys.config import Config, to_dict
    from towers.lit_module import TwoTowerLightning

    shape = TowerShape(n_users=10, n_products=30, n_sellers=4, n_categories=1, n_brands=1, n_product_features=0,
                       n_seller_features=0, dim=8)
    batch = {"user_idx": torch.tensor([1, 2]), "product_idx": torch.tensor([5, 6]),
             "seller_idx": torch.tensor([1, 0]), "weight": torch.ones(2),
             "hist_products": torch.tensor([[4, 0], [1, 2]]), "hist_sellers": torch.tensor([[1, 0], [2, 0]]),
             "hour": torch.full((2,), -1), "dow": torch.full((2,), -1)}

    def lit_with(l2: float) -> TwoTowerLightning:
        train = {**to_dict(Config().train), "embedding_l2": l2, "num_negatives": 4}
        torch.manual_seed(0)
        lit = TwoTowerLightning(shape.to_dict(), train, {}).eval()
        lit._gen.manual_seed(0)
        return lit

    base, parts0 = lit_with(0.0).compute_loss(batch)
    lit = lit_with(0.5)
    loss, parts = lit.compute_loss(batch)
    assert "embedding_l2" not in parts0 and float(parts["embedding_l2"]) > 0
    assert torch.allclose(loss, base + 0.5 * parts["embedding_l2"], atol=1e-6)
    m = lit.model
    lit._gen.manual_seed(0)
    neg = uniform_negatives(4, 30, lit._gen, lit.device)
    rows = torch.unique(torch.cat([batch["product_idx"], neg, batch["hist_products"].reshape(-1)]))
    rows = rows[rows > 0]
    expect = (m.products.id_emb.weight[rows].pow(2).sum(1).mean()
              + m.sellers.id_emb.weight[torch.tensor([1, 2])].pow(2).sum(1).mean()
              + m.users.id_emb.weight[torch.tensor([1, 2])].pow(2).sum(1).mean())
    assert torch.allclose(lit.embedding_penalty(batch, neg), expect, atol=1e-6)
    lit.embedding_penalty(batch, neg).backward()
    g = m.products.id_emb.weight.grad.coalesce()  # sparse: only the touched rows get a gradient
    assert set(g.indices()[0].tolist()) == set(rows.tolist())


def test_recency_positions_count_back_from_the_last_kept_entry() -> None:
    """Holes left by history dropout still count as positions; empty rows are all 0."""
    from towers.history_encoder import recency_positions

    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert recency_positions(mask, 511).tolist() == [[2, 1, 0, 0, 0], [3, 2, 1, 0, 0], [0, 0, 0, 0, 0]]
    assert recency_positions(mask, 1).tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]


def test_recency_pooling_starts_as_the_mean_and_can_keep_only_the_latest_item() -> None:
    kw = dict(n_users=5, n_products=20, n_sellers=4, n_categories=1, n_brands=1, n_product_features=0,
              n_seller_features=0, dim=8, use_user_id=False, dropout=0.0)
    b = {"user_idx": torch.tensor([1, 2]), "hist_products": torch.tensor([[1, 2, 0], [5, 6, 7]]),
         "hist_sellers": torch.tensor([[1, 0, 0], [2, 2, 3]])}
    torch.manual_seed(0)
    mean = TwoTowerModel(TowerShape(**kw)).eval()
    rec = TwoTowerModel(TowerShape(**kw, history_pooling="recency")).eval()
    rec.load_state_dict(mean.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.allclose(rec.user_vectors(b), mean.user_vectors(b), atol=1e-6)
        rec.users.history.log_recency[1:] = -60.0  # only the latest item counts
        latest = {"user_idx": b["user_idx"], "hist_products": torch.tensor([[2], [7]]), "hist_sellers": torch.tensor([[0], [3]])}
        assert torch.allclose(rec.user_vectors(b), mean.user_vectors(latest), atol=1e-5)
        # the dense path (HistoryEncoder.forward over [B, L, d]) pools the same way as the embedding_bag path
        items = rec.products.id_emb(b["hist_products"])
        dense = rec.users.history(items, b["hist_products"] > 0)
        assert torch.allclose(dense, items[[0, 1], [1, 2]], atol=1e-5)
    rec.train()
    rec.users.history.log_recency.data.zero_()
    (rec.user_vectors(b) * rec.product_vectors(torch.tensor([3, 4]))).sum().backward()
    g = rec.users.history.log_recency.grad
    assert g is not None and g[:3].abs().sum() > 0 and g[3:].abs().sum() == 0


def test_recency_pooling_learns_that_only_the_latest_item_predicts_the_next() -> None:
    """Planted order: the target is the successor of the history's LAST item; earlier items are noise."""
    torch.manual_seed(0)
    n, L, B = 40, 6, 128
    shape = TowerShape(n_users=2, n_products=n + 1, n_sellers=1, n_categories=1, n_brands=1, n_product_features=0,
                       n_seller_features=0, dim=16, use_user_id=False, dropout=0.0, sparse=False,
                       history_pooling="recency")
    m = TwoTowerModel(shape)
    opt = torch.optim.Adam(m.parameters(), lr=0.03)
    for _ in range(150):
        hist = torch.randint(1, n + 1, (B, L))
        target = hist[:, -1] % n + 1
        u = m.user_vectors({"user_idx": torch.zeros(B, dtype=torch.long), "hist_products": hist})
        logits = u @ m.product_vectors(torch.arange(n + 1)).T / 0.1
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = m.users.history.log_recency.detach().exp()
    assert w[0] > 5 * w[1:L].max()  # the latest item dominates the pooled history


def test_short_long_pooling_mixes_a_long_and_a_short_profile() -> None:
    """Two profiles pooled side by side; the projection starts as their average."""
    kw = dict(n_users=5, n_products=20, n_sellers=4, n_categories=1, n_brands=1, n_product_features=0,
              n_seller_features=0, dim=8, use_user_id=False, dropout=0.0)
    b = (torch.tensor([1, 2]), torch.tensor([[1, 2, 0], [5, 6, 7]]), torch.tensor([[1, 0, 0], [2, 2, 3]]))
    latest = (b[0], torch.tensor([[2], [7]]), torch.tensor([[0], [3]]))
    torch.manual_seed(0)
    mean = TwoTowerModel(TowerShape(**kw)).eval()
    sl = TwoTowerModel(TowerShape(**kw, history_pooling="short_long")).eval()
    sl.load_state_dict({k: v for k, v in mean.state_dict().items() if "hist_proj" not in k}, strict=False)
    h = sl.users.history
    assert h.log_recency.shape == (2, 512) and h.log_recency[0].abs().sum() == 0  # profile 0 starts as the mean
    assert h.log_recency[1, 0] > h.log_recency[1, 1] > h.log_recency[1, 2]  # profile 1 starts steep
    with torch.no_grad():
        h.log_recency[1, 1:] = -60.0  # the short profile keeps only the latest item
        assert torch.allclose(sl.users(*b), 0.5 * (mean.users(*b) + mean.users(*latest)), atol=1e-5)
        items = sl.products.id_emb(b[1])
        dense = h(items, b[1] > 0)  # the dense path returns both pooled vectors side by side
        assert dense.shape == (2, 16)
        assert torch.allclose(dense[:, 8:], items[[0, 1], [1, 2]], atol=1e-5)
        assert torch.allclose(dense[:, :8], (items * (b[1] > 0).unsqueeze(-1)).sum(1) / torch.tensor([[2.0], [3.0]]), atol=1e-5)
    sl.train()
    (sl.user_vectors({"user_idx": b[0], "hist_products": b[1]}) * sl.product_vectors(torch.tensor([3, 4]))).sum().backward()
    assert h.log_recency.grad[0, :3].abs().sum() > 0 and h.log_recency.grad[:, 3:].abs().sum() == 0


def test_hide_latest_keeps_a_prefix_of_each_history() -> None:
    from towers.history_horizon import hide_latest

    hist = torch.tensor([[5, 6, 7, 8, 9, 0], [3, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    assert torch.equal(hide_latest(hist, 0.0), hist > 0)
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        keep = hide_latest(hist, 0.5, g)
        n0 = int(keep[0].sum())
        assert torch.equal(keep[0, :n0], torch.ones(n0, dtype=torch.bool)) and not keep[0, n0:].any()  # a prefix
        seen.add(n0)
        assert keep[1].tolist() == [True] + [False] * 5  # one item: always kept
        assert not keep[2].any()  # padding stays padding
    assert seen == {3, 4, 5}  # floor(u * 0.5 * 5) hides 0, 1 or 2 of 5
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match="history_horizon"):
            hide_latest(hist, bad)


def test_history_horizon_hides_the_same_latest_slots_of_products_and_sellers() -> None:
    from recsys.config import Config, to_dict
    from towers.lit_module import TwoTowerLightning

    shape = TowerShape(n_users=10, n_products=30, n_sellers=9, n_categories=1, n_brands=1, n_product_features=0,
                       n_seller_features=0, dim=8)
    hist = torch.tensor([[4, 5, 6, 7, 8, 9, 10, 11], [3, 2, 0, 0, 0, 0, 0, 0]])
    batch = {"user_idx": torch.tensor([1, 2]), "hist_products": hist, "hist_sellers": (hist % 8) + 1}
    lit = TwoTowerLightning(shape.to_dict(), to_dict(Config().train), {"history_horizon": 0.75})
    lengths = set()
    for _ in range(100):
        b = lit._augment(batch)
        kept = b["hist_products"] > 0
        assert torch.equal(kept, b["hist_sellers"] > 0)
        assert torch.equal(b["hist_products"][kept], hist[kept])  # only hidden, never moved
        n = kept.sum(1)
        assert torch.equal(kept[0], torch.arange(8) < n[0])  # a prefix: the latest are hidden
        lengths.add(int(n[0]))
        assert 1 <= int(n[1]) <= 2
    assert lengths == {3, 4, 5, 6, 7, 8}  # floor(u * 0.75 * 8), u in [0, 1), hides 0..5 of 8


def test_loss_and_gradients_under_bf16_autocast_are_close_to_fp32() -> None:
    # bf16 mixed precision (train.precision on a GPU) runs the logit product in bf16; the softmax
    # and the gradients stay fp32. Checked here with CPU autocast, which takes the same path.
    g = torch.Generator().manual_seed(11)
    q = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1).requires_grad_()
    table = torch.randn(7, 8, generator=g).requires_grad_()
    pid, nid = torch.randint(1, 6, (16,), generator=g), torch.randint(1, 7, (10,), generator=g)
    corr, nc = torch.randn(7, generator=g), torch.randn(10, generator=g)

    def loss_and_grads():
        p = torch.nn.functional.normalize(table[pid], dim=-1)
        neg = torch.nn.functional.normalize(table[nid], dim=-1)
        loss = sampled_softmax_loss(q, p, pid, 0.1, neg, nid, corr[pid], nc)
        return loss, torch.autograd.grad(loss, (q, table))

    want, want_grads = loss_and_grads()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = loss_and_grads()
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=0.02)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert a.dtype == torch.float32 and torch.allclose(a, b, atol=0.05 * b.abs().max().item())


def test_a_second_backward_through_the_loss_is_refused() -> None:
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    p = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    loss = sampled_softmax_loss(q, p, torch.tensor([1, 2, 3, 4]), 0.1)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()
