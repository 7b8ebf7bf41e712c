"""Ranker data (Spark), training, evaluation and serving on a tiny marketplace run, end to end.

One module fixture runs every stage once (untrained towers, so retrieval is arbitrary: these tests
check labels, leakage, artifacts and wiring, not quality; tests/test_ranking_model.py checks that
the ranker learns).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from ranking import data, evaluate, train
from tests.test_ranking_support import N_TRAIN, make_world, world_cfg

WEIGHTS = {0: 0.2, 1: 0.5, 2: 1.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory, spark):
    from retrieval import bundle

    tmp = tmp_path_factory.mktemp("ranking")
    cfg = world_cfg("train.register_model=true", "train.experiment=rk")
    prep, run, cfg = make_world(tmp, cfg)
    manifest = data.run(cfg, run, spark=spark)
    summary = train.run(cfg, run)
    report = evaluate.run(cfg, run)
    bundle.run(cfg, run)
    return {"cfg": cfg, "prep": prep, "run": run, "manifest": manifest, "summary": summary, "report": report}


def _rows(run: Path, phase: str) -> pd.DataFrame:
    return ds.dataset(str(run / "ranker_data" / "candidates" / f"phase={phase}"), format="parquet").to_table().to_pandas()


def _events(prep: Path, split: str) -> pd.DataFrame:
    return pq.read_table(prep / "examples" / split, columns=["user_idx", "product_idx", "seller_idx", "event"]).to_pandas()


@pytest.mark.parametrize("phase, split", [("train", "val"), ("test", "test")])
def test_labels_are_the_strongest_later_event_per_offer(world, phase, split) -> None:
    rows = _rows(world["run"], phase)
    ev = _events(world["prep"], split)
    best = ev.groupby(["user_idx", "product_idx", "seller_idx"])["event"].max().rename("want").reset_index()
    m = rows.merge(best, on=["user_idx", "product_idx", "seller_idx"], how="left")
    want = m["want"].map(WEIGHTS).fillna(0.0).to_numpy()
    np.testing.assert_allclose(m["label"].to_numpy(), want, atol=1e-6)
    assert (m["event"].to_numpy() == m["want"].fillna(-1).to_numpy()).all()
    # every product of the split a user touched is labelled on exactly the offer they used
    lab = rows[rows["label"] > 0]
    assert not lab.duplicated(["user_idx", "product_idx"]).any()
    if phase == "train":  # all val positives are present (retrieved or added): one view, one cart, one purchase each
        per_user = lab.groupby("user_idx")["label"].apply(lambda x: sorted(round(float(v), 3) for v in x))
        assert all(v == [0.2, 0.5, 1.0] for v in per_user)
        assert len(per_user) == world["manifest"]["phases"]["train"]["lists"]


def test_missed_positives_added_to_training_only(world) -> None:
    N = world["manifest"]["candidates"]
    tr, te = _rows(world["run"], "train"), _rows(world["run"], "test")
    assert te["added"].sum() == 0 and tr["added"].sum() > 0
    added = tr[tr["added"]]
    assert (added["rank"] > N).all()  # their true whole-catalog rank, never a rank serving produces
    retrieved = tr[~tr["added"]][["user_idx", "product_idx"]].drop_duplicates()
    clash = added.merge(retrieved, on=["user_idx", "product_idx"])
    assert clash.empty  # only products retrieval missed
    val = _events(world["prep"], "val")[["user_idx", "product_idx"]].drop_duplicates()
    assert len(added[["user_idx", "product_idx"]].drop_duplicates().merge(val)) == len(
        added[["user_idx", "product_idx"]].drop_duplicates())  # every added product is a val positive
    # each added product comes with all its offers (not just the one the user used)
    offers = pq.read_table(world["run"] / "ranker_data" / "offers.parquet").to_pandas()
    n_off = offers.groupby("product_idx").size()
    got = added.groupby(["user_idx", "product_idx"]).size().reset_index(name="n")
    assert (got["n"].to_numpy() == n_off.loc[got["product_idx"]].to_numpy()).all()
    assert world["manifest"]["phases"]["train"]["added_labelled_rows"] > 0


def test_no_leakage_histories_and_features_stop_before_the_label_split(world) -> None:
    prep, run = world["prep"], world["run"]
    tr = _rows(run, "train")
    test_only = _events(prep, "test")[["user_idx", "product_idx"]].drop_duplicates()
    val = _events(prep, "val")[["user_idx", "product_idx"]].drop_duplicates()
    test_only = test_only.merge(val, how="left", indicator=True)
    test_only = test_only[test_only["_merge"] == "left_only"].drop(columns="_merge")
    assert tr[tr["label"] > 0].merge(test_only, on=["user_idx", "product_idx"]).empty
    u_tr = pq.read_table(run / "ranker_data" / "train" / "users.parquet").to_pandas()
    u_te = pq.read_table(run / "ranker_data" / "test" / "users.parquet").to_pandas()
    assert (u_tr["n_events"] == N_TRAIN).all()  # train split only
    assert (u_te["n_events"] == N_TRAIN + 6).all()  # train + val (1 view, view+cart, view+cart+purchase)
    train_ev = _events(prep, "train")
    for _, r in u_tr.head(10).iterrows():
        seen = set(train_ev[train_ev["user_idx"] == r["user_idx"]]["product_idx"])
        assert set(int(p) for p in r["hist_products"] if p > 0) <= seen
    # already-bought (train purchases) are never candidates of the train lists
    bought = train_ev[train_ev["event"] == 2][["user_idx", "product_idx"]].drop_duplicates()
    assert tr.merge(bought, on=["user_idx", "product_idx"]).empty


def test_ranker_artifact_tracking_and_report(world) -> None:
    from mlflow.tracking import MlflowClient

    from recsys.artifacts import read_manifest

    run, summary, report = world["run"], world["summary"], world["report"]
    read_manifest(run / "ranker", verify=True)
    state = torch.load(run / "ranker" / "ranker.pt", weights_only=True)
    desc = json.loads((run / "ranker" / "ranker.json").read_text())
    assert "cross.0.w.weight" in state and desc["shape"]["cross_layers"] == 2 and desc["loss"] == "listwise"
    model, _ = train.load_ranker(run / "ranker")
    assert sum(p.numel() for p in model.parameters()) > 0
    client = MlflowClient(desc["mlflow"]["tracking_uri"])
    mv = client.get_model_version_by_alias("rk-ranker", "champion")
    assert mv.run_id == summary["mlflow_run_id"]
    hist = client.get_metric_history(summary["mlflow_run_id"], "val/graded_ndcg10")
    assert len(hist) == summary["epochs_trained"]
    loss = client.get_metric_history(summary["mlflow_run_id"], "train/loss")  # the epoch mean, once per epoch
    assert len(loss) == summary["epochs_trained"] and all(np.isfinite(m.value) and m.value > 0 for m in loss)
    assert report["users"] > 0 and set(report["all"]) == {"ndcg@10", "recall@10", "mrr"}
    nd = report["all"]["ndcg@10"]
    assert nd["ci"]["lift"][0] <= nd["lift"] <= nd["ci"]["lift"][1]
    assert report["all"]["recall@10"]["lift"] == pytest.approx(0.0, abs=1e-9)  # same candidates, same recall@N
    assert (run / "ranker_eval" / "report.md").read_text().startswith("# Ranker vs retrieval order")


def test_scorer_ranks_real_candidates_and_best_sellers(world) -> None:
    from ranking.scorer import Ranker, RankerError, UnknownProductError
    from retrieval.bundle import load_bundle
    from retrieval.retriever import Retriever

    cfg, run = world["cfg"], world["run"]
    r = Ranker.load(run / "ranker", run)
    assert not r.towers_mismatch
    ret = Retriever(load_bundle(run), cfg)
    cands = ret.recommend_products(["u1"], 10)[0].candidates
    ranked = r.rank("u1", cands, {"hour": 10, "dow": 3})
    assert sorted(p for p, _, _ in ranked) == sorted(c.product_id for c in cands)
    scores = [s for _, _, s in ranked]
    assert scores == sorted(scores, reverse=True)
    # expanding offers picks the best-scoring offer of each product
    exp = r.rank_detailed("u1", [{"product_id": c.product_id} for c in cands], {"hour": 10, "dow": 3})
    for item in exp:
        offers = r.best_sellers(item.product_id, "u1", 10, {"hour": 10, "dow": 3})
        if offers:
            assert item.seller_id == offers[0]["seller_id"]
    assert r.rank("u1", [{"product_id": "nope"}, cands[0]])[-1][0] == "nope"
    with pytest.raises(UnknownProductError):
        r.best_sellers("nope")
    bs = r.best_sellers("p1", "u2", k=5)
    assert [b["rank"] for b in bs] == list(range(1, len(bs) + 1)) and all("seller_affinity" in b for b in bs)
    bad = json.loads((run / "ranker" / "ranker.json").read_text())
    bad["vocab_fingerprint"] = "different"
    other = run.parent / "ranker_bad"
    other.mkdir()
    for f in (run / "ranker").iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    (other / "ranker.json").write_text(json.dumps(bad))
    with pytest.raises(RankerError, match="vocabulary"):
        Ranker.load(other, run, verify=False)
    old = json.loads((run / "ranker" / "ranker.json").read_text())
    old["features"]["candidate"] = ["retrieval_score", "retrieval_rank"]  # a ranker from before not_retrieved
    (other / "ranker.json").write_text(json.dumps(old))
    with pytest.raises(RankerError, match="retrain"):
        Ranker.load(other, run, verify=False)
    code = (
        "import sys, json\n"
        "from ranking.scorer import Ranker\n"
        f"r = Ranker.load({str(run / 'ranker')!r}, {str(run)!r})\n"
        "print(json.dumps(r.rank('u3', [{'product_id': 'p5'}, {'product_id': 'p9', 'seller_id': 's1'}])))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', 'pyspark'))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_services_end_to_end_over_http_clients(world) -> None:
    from fastapi.testclient import TestClient

    from ranking.scorer import Ranker
    from ranking.service import create_app
    from retrieval.client import RetrievalClient
    from retrieval.service import create_app as retrieval_app

    cfg, run = world["cfg"], world["run"]
    rc = RetrievalClient("http://testserver", http_client=TestClient(retrieval_app(run, cfg)))
    app = create_app(Ranker.load(run / "ranker", run), cfg, rc)
    c = TestClient(app)
    r = c.post("/v1/recommend", json={"user_id": "u4", "k": 5, "context": {"hour": 9, "dow": 1}},
               headers={"X-Request-ID": "e2e-1"})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["fallback"] is None and len(b["items"]) == 5 and b["request_id"] == "e2e-1"
    assert rc.last_request_id == "e2e-1"  # propagated to the retrieval service
    bundle_version = rc.readyz()["bundle_version"]
    assert b["bundle_version"] == bundle_version and b["ranker_version"] == app.state.ranker.version
    assert [i["rank"] for i in b["items"]] == [1, 2, 3, 4, 5]
    scores = [i["score"] for i in b["items"]]
    assert scores == sorted(scores, reverse=True)
    bs = c.get("/v1/products/p2/best-sellers", params={"user_id": "u4"})
    assert bs.status_code == 200 and bs.json()["product_id"] == "p2"
    assert c.get("/readyz").json()["retrieval"] == "ok"
