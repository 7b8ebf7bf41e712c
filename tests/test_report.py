"""``recsys report`` on a fabricated run directory in the real artifact formats."""

from __future__ import annotations

import base64
import json
import re
import sys
import types
from pathlib import Path

import pytest

from recsys import report


def _metrics(scale: float, n_cat: int = 100) -> dict:
    ks = (10, 20, 50, 100)
    m = {}
    for k in ks:
        m[f"recall@{k}"] = round(scale * k / 200, 4)
        m[f"hit@{k}"] = round(min(1.0, scale * k / 100), 4)
    for k in (10, 20):
        m[f"ndcg@{k}"] = round(scale * k / 400, 4)
    m["mrr"] = round(scale * 0.1, 4)
    m["users"] = 500
    m["coverage@10"] = round(0.1 * scale, 4)
    m["coverage@100"] = round(0.5 * scale, 4)
    m["avg_pop@20"] = round(100 / scale, 2)
    m["slices"] = {
        "light_users": {"recall@10": 0.01 * scale, "recall@20": 0.02 * scale, "ndcg@10": 0.01, "mrr": 0.02, "users": 100},
        "heavy_users": {"recall@10": 0.03 * scale, "recall@20": 0.05 * scale, "ndcg@10": 0.03, "mrr": 0.05, "users": 100},
        "no_history_users": {"recall@10": 0.005, "recall@20": 0.01, "ndcg@10": 0.005, "mrr": 0.01, "users": 20},
        "cold_start_items": {"recall@10": 0.0, "recall@20": 0.001, "ndcg@10": 0.0, "mrr": 0.0, "users": 30},
    }
    return m


def _eval_report(scale: float = 1.0) -> dict:
    return {
        "split": "test", "targets": ["purchase"], "users": 500,
        "models": {
            "two_tower": {"products": _metrics(scale), "sellers": _metrics(scale * 1.5), "seconds": 1.2},
            "popularity": {"products": _metrics(0.5), "sellers": _metrics(0.8), "seconds": 0.1},
            "spark_als": {"products": _metrics(0.8), "sellers": _metrics(1.0), "seconds": 5.0},
        },
        "config": {"eval": {"ks": [10, 20, 50, 100]}},
    }


def _write(p: Path, obj) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def fabricate(run: Path, scale: float = 1.0, full: bool = True) -> Path:
    _write(run / "eval" / "report.json", _eval_report(scale))
    if not full:
        return run
    blk = {m: {"ranker": 0.2, "retrieval": 0.15, "lift": 0.05, "lift_rel": 0.33,
               "ci": {"ranker": [0.18, 0.22], "retrieval": [0.13, 0.17], "lift": [0.02, 0.08]}}
           for m in ("ndcg@10", "recall@10", "mrr")}
    _write(run / "ranker_eval" / "report.json", {"split": "test", "targets": ["purchase"], "candidates": 100,
                                                 "lists": 400, "loss": "listwise", "users": 400,
                                                 "reachable_users": 300, "bootstrap_samples": 1000,
                                                 "all": blk, "reachable": blk, "seconds": 2.0})
    # Lightning CSVLogger: step rows (train/loss_step) and epoch rows (train/loss_epoch, val/*)
    rows = ["epoch,step,train/loss_step,train/loss_epoch,train/user_product_epoch,val/recall@10,val/recall@20,val/ndcg@10"]
    step = 0
    for e in range(4):
        for _ in range(3):
            rows.append(f"{e},{step},{3.0 - 0.2 * e},,,,,")
            step += 1
        rows.append(f"{e},{step - 1},,,,{0.05 + 0.01 * e},{0.08 + 0.02 * e},{0.03 + 0.01 * e}")
        rows.append(f"{e},{step - 1},,{2.9 - 0.3 * e},{2.0 - 0.2 * e},,,")
    _write(run / "logs" / "towers" / "metrics.csv", "\n".join(rows) + "\n")
    _write(run / "index" / "manifest.json", {
        "stage": "index", "dim": 64, "metric": "inner_product",
        "indexes": {
            "products": {"factory": "HNSW32", "n": 2000, "dim": 64, "recall_k": 100, "recall": 0.991,
                         "recall_floor": 0.95, "recall_queries": 1000, "settings": {"ef_search": 128},
                         "tuning": [{"ef_search": 128, "recall": 0.991}], "build_seconds": 0.4,
                         "latency_ms": {"p50": 0.8, "p99": 2.1}},
            "sellers": {"factory": "Flat", "n": 100, "dim": 64, "recall_k": 100, "recall": 1.0,
                        "settings": {}, "build_seconds": 0.01},
        }})
    _write(run / "prepared" / "manifest.json", {
        "stage": "prepare", "n_users": 3001, "n_products": 2001, "n_sellers": 101, "has_timestamps": True,
        "rows": {"events_accepted": 99000, "events_by_split": {"train": 80000, "val": 9000, "test": 10000},
                 "examples": {"train": 20000, "val": 2000, "test": 2500}},
        "rejected": {"events": {"duplicate": 12, "unknown_event_type": 3}, "products": {}},
        "validation": {"events": {"input": 99015, "accepted": 99000, "duplicates": 12,
                                  "rejected": {"duplicate": 12, "unknown_event_type": 3}}},
        "split": {"method": "temporal", "val_start": "2024-05-01"}})
    _write(run / "stages.json", {"prepare": {"key": "a", "seconds": 12.5, "summary": {}},
                                 "train": {"key": "b", "seconds": 60.0, "summary": {}}})
    return run


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def test_report_contents(tmp_path, monkeypatch):
    run = fabricate(tmp_path / "run1")
    path = report.run(run, mlflow=False)
    assert path == run / "report" / "report.html"
    html = path.read_text()
    imgs = _images(html)
    assert len(imgs) >= 5 and all(b.startswith(b"\x89PNG") for b in imgs)
    assert "src=\"http" not in html and "<link" not in html  # self-contained
    for text in ("Models side by side", "two_tower", "spark_als", "popularity", "ranker", "recall@20", "ndcg@10",
                 "coverage@100", "avg_pop@20", "cold_start_items", "no_history_users", "light_users", "heavy_users",
                 "Training curves", "train/loss_epoch", "val/recall@20", "Retrieval index", "HNSW32", "0.9910",
                 "latency_ms.p99", "Data", "unknown_event_type", "events_by_split.test", "Stages",
                 "Ranker vs retrieval order"):
        assert text in html, text
    assert html.count("<table>") >= 10
    # the main products table lists two-tower first, then the ranker rows, then the baselines
    main = html.split("<h3>products</h3>", 1)[1].split("</table>", 1)[0]
    order = [m for m in ("two_tower", "ranker", "spark_als", "popularity") if m in main]
    assert order == ["two_tower", "ranker", "spark_als", "popularity"]
    md = (run / "report" / "report.md").read_text()
    assert "| model | users | recall@10 |" in md and "](plots/recall_at_k.png)" in md
    assert {p.name for p in (run / "report" / "plots").glob("*.png")} >= {
        "recall_at_k.png", "ndcg_at_k.png", "coverage_popularity.png", "slices.png", "training.png"}
    series = report.read_training_log(run / "logs" / "towers" / "metrics.csv")
    assert [round(v, 3) for _, v in series["train/loss_epoch"]] == [2.9, 2.6, 2.3, 2.0]
    assert "train/loss_step" not in series


def test_compare_runs_and_minimal_run(tmp_path):
    a = fabricate(tmp_path / "a")
    b = fabricate(tmp_path / "b", scale=1.3, full=False)  # only the evaluation report
    c = tmp_path / "c"  # nothing at all: skipped with a note
    c.mkdir()
    out = report.run(a, compare=[b, c], out_dir=tmp_path / "out", mlflow=False)
    html = out.read_text()
    assert "Runs compared" in html and "no eval/report.json; skipped" in html
    section = html.split("Runs compared", 1)[1].split("<h2>", 1)[0]
    assert section.count("<td>a</td>") >= 1 and section.count("<td>b</td>") >= 1
    assert (tmp_path / "out" / "plots" / "compare_recall.png").exists()
    only = report.run(b, mlflow=False).read_text()
    assert "Models side by side" in only and "Training curves" not in only and len(_images(only)) >= 3
    with pytest.raises(FileNotFoundError, match="evaluate"):
        report.run(c)


def test_logs_to_the_runs_mlflow_run(tmp_path, monkeypatch):
    calls = []

    class FakeClient:
        def __init__(self, uri):
            self.uri = uri

        def log_artifacts(self, run_id, local_dir, artifact_path=None):
            calls.append((self.uri, run_id, sorted(p.name for p in Path(local_dir).iterdir()), artifact_path))

    fake = types.ModuleType("mlflow.tracking")
    fake.MlflowClient = FakeClient
    monkeypatch.setitem(sys.modules, "mlflow", types.ModuleType("mlflow"))
    monkeypatch.setitem(sys.modules, "mlflow.tracking", fake)
    for name in ("plot_curves", "plot_coverage_popularity", "plot_slices", "plot_training"):  # not under test here
        monkeypatch.setattr(report, name, lambda *a, **k: None)
    run = fabricate(tmp_path / "run", full=False)
    report.run(run)  # no model.json: nothing to log
    assert calls == []
    _write(run / "model" / "model.json", {"mlflow": {"tracking_uri": "sqlite:///x.db", "run_id": "abc123"}})
    report.run(run)
    assert calls and calls[0][:2] == ("sqlite:///x.db", "abc123") and calls[0][3] == "report"
    assert {"report.html", "report.md", "plots"} <= set(calls[0][2])
