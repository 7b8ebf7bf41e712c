"""The outside contract end to end: `recsys fit` then `recsys recommend`, on a tiny synthetic marketplace."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from recsys.cli import main


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, spark):
    from data_pipelines import synthetic

    root = tmp_path_factory.mktemp("e2e")
    raw = root / "raw"
    synthetic.generate(raw, preset="tiny", seed=3)
    run = root / "run"
    sets = ["train.epochs=2", "train.batch_size=256", "train.num_negatives=256", "eval.baselines=[popularity]",
            "data.max_history=20", "train.register_model=false", "ranking.enabled=false"]
    args = ["fit", "--data", str(raw), "--out", str(run)]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    return raw, run, args


def test_fit_writes_every_stage(fitted) -> None:
    _, run, _ = fitted
    for d in ("prepared", "model", "model_full", "eval", "export", "index"):
        assert (run / d / "manifest.json").exists(), d
    assert (run / "bundles" / "CURRENT").exists()
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["models"]["two_tower"]["products"]["recall@100"] > report["models"]["popularity"]["products"]["recall@10"]
    # the popularity prior: chosen on validation over the whole grid, carried to the refit, used by eval and export
    sel = json.loads((run / "model" / "model.json").read_text())["popularity_prior"]
    grid = json.loads((run / "config.json").read_text())["train"]["popularity_prior_grid"]
    assert sorted(float(w) for w in sel["validation"]) == sorted(grid) and sel["weight"] in grid
    best = max(v["recall@20"] for v in sel["validation"].values())
    assert sel["validation"][str(float(sel["weight"]))]["recall@20"] == best
    full = json.loads((run / "model_full" / "model.json").read_text())["popularity_prior"]
    assert full == {"weight": sel["weight"], "validation": {}}
    assert report["models"]["two_tower"]["popularity_prior"] == sel["weight"]
    assert json.loads((run / "export" / "manifest.json").read_text())["popularity_prior"] == sel["weight"]


def test_recommend_contract(fitted, tmp_path) -> None:
    raw, run, _ = fitted
    ev = pq.read_table(raw / "events").to_pandas()
    known = sorted(ev["user_id"].unique())[:5]
    users = tmp_path / "users.txt"
    users.write_text("\n".join([*known, "never-seen-user"]) + "\n")
    out = tmp_path / "recs.parquet"
    assert main(["recommend", "--run", str(run), "--users", str(users), "--k", "10", "--out", str(out)]) == 0
    df = pq.read_table(out).to_pandas()
    assert {"user_id", "product_id", "rank", "score", "seller_id", "fallback"} <= set(df.columns)
    assert (df.groupby("user_id").size() == 10).all() and df["user_id"].nunique() == 6
    assert df.loc[df.user_id == "never-seen-user", "fallback"].all()
    assert not df.loc[df.user_id != "never-seen-user", "fallback"].any()
    bought = ev[ev.event_type == "purchase"].groupby("user_id")["product_id"].apply(set)
    for u in known:
        recs = set(df.loc[df.user_id == u, "product_id"])
        assert not recs & bought.get(u, set()), f"{u} was recommended an item already bought"
    out2 = tmp_path / "sellers.parquet"
    assert main(["recommend", "--run", str(run), "--users", str(users), "--k", "3", "--out", str(out2), "--what", "sellers"]) == 0
    s = pq.read_table(out2).to_pandas()
    assert {"user_id", "seller_id", "rank", "score"} <= set(s.columns) and len(s) == 18


def test_rerun_skips_unchanged_stages(fitted, capsys) -> None:
    _, run, args = fitted
    before = json.loads((run / "stages.json").read_text())
    assert main(args) == 0
    after = json.loads((run / "stages.json").read_text())
    assert after == before
    assert "up to date" in capsys.readouterr().err
    assert main([*args, "--from", "export"]) == 0
    again = json.loads((run / "stages.json").read_text())
    assert again["train"] == before["train"] and again["export"]["summary"] is not None


def test_an_evaluation_setting_reruns_evaluation_not_training(fitted, capsys) -> None:
    _, run, args = fitted
    before = json.loads((run / "stages.json").read_text())
    capsys.readouterr()
    assert main([*args, "--set", "eval.heavy_user_quantile=0.7"]) == 0
    err = capsys.readouterr().err
    after = json.loads((run / "stages.json").read_text())
    assert "train: up to date" in err and "evaluate: running" in err, err
    assert after["train"] == before["train"] and after["evaluate"]["key"] != before["evaluate"]["key"]
