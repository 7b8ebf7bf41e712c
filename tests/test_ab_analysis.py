"""A/B analysis: attribution rules on a hand-made log, statistics, SRM, the sample-size planner."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from recsys.ab.analysis import (
    _attribute,
    _welch_p,
    analyze,
    minimum_detectable_lift,
    plan_sample_size,
    power_two_proportions,
    read_events,
    srm_check,
)
from recsys.ab.exposure_log import ExposureLogWriter
from recsys.config import ABConfig, ABVariant

T0 = 1_717_200_000  # epoch seconds
H, D = 3600, 86400


def _write_log(path, rows):
    with ExposureLogWriter(path, flush_interval_s=0) as w:
        for rid, user, variant, items, t in rows:
            w.log_exposure(rid, user, "exp", variant, items, bundle_version=variant, timestamp=t)


@pytest.fixture()
def small(tmp_path):
    log = tmp_path / "log"
    _write_log(log, [
        ("r1", "A", "control", [{"product_id": "p1", "seller_id": "s1"}, {"product_id": "p2", "seller_id": "s2"}], T0),
        ("r2", "B", "treatment", [{"product_id": "p3", "seller_id": "s3"}], T0),
        ("r3", "C", "treatment", [{"product_id": "p5", "seller_id": "s1"}, {"product_id": "p6", "seller_id": "s1"}], T0),
        ("r4", "C", "treatment", [{"product_id": "p6", "seller_id": "s1"}], T0 + 2 * D),  # p6 shown again at 1
        ("r5", "E", "control", [], T0),  # an empty response: the user still counts
    ])
    ev = pd.DataFrame([
        ("A", "p2", "view", T0 + 1 * H, 10.0, 1),
        ("A", "p2", "view", T0 + 2 * H, 10.0, 1),       # second view of the same impression: one click
        ("A", "p2", "purchase", T0 + 3 * H, 10.0, 2),   # shown purchase: revenue 20
        ("A", "p9", "purchase", T0 - 1 * H, 99.0, 1),   # before the exposure: ignored
        ("B", "p3", "view", T0 - 2 * H, 5.0, 1),        # view before the exposure: not a click
        ("B", "p3", "purchase", T0 + 8 * D, 5.0, 1),    # after the 7-day window: ignored
        ("B", "p4", "purchase", T0 + 1 * D, 7.0, 1),    # in window, not shown: conversion_any only
        ("C", "p6", "view", T0 + 3 * D, 4.0, 1),        # click on r4 position 1 (latest showing), not r3 pos 2
        ("C", "p6", "purchase", T0 + 3 * D + H, 4.0, 1),
        ("Z", "p1", "purchase", T0 + H, 1.0, 1),        # not in the experiment
    ], columns=["user_id", "product_id", "event_type", "timestamp", "price", "quantity"])
    return log, ev


def test_attribution_rules(small, tmp_path):
    log, ev = small
    ab = ABConfig(experiment="exp", variants=(ABVariant("control", 1), ABVariant("treatment", 1)))
    rep = analyze(log, ev, out_dir=tmp_path / "out", ab=ab, n_boot=200)
    c, t = rep["variants"]["control"], rep["variants"]["treatment"]
    assert (c["users"], t["users"]) == (2, 2)
    assert (c["responses"], c["impressions"], t["responses"], t["impressions"]) == (2, 2, 3, 4)
    m = c["metrics"]
    assert m["conversion_shown"]["mean"] == 0.5 and m["conversion_any"]["mean"] == 0.5  # A yes, E no
    assert m["revenue_per_user"]["mean"] == 10.0 and m["revenue_shown_per_user"]["mean"] == 10.0
    assert m["ctr"]["mean"] == 0.5  # A: 1 clicked impression of 2; E has none
    m = t["metrics"]
    assert m["conversion_shown"]["mean"] == 0.5  # C bought the shown p6; B's shown purchase is too late
    assert m["conversion_any"]["mean"] == 1.0  # B's p4 counts
    assert m["revenue_per_user"]["mean"] == pytest.approx((7.0 + 4.0) / 2)
    assert m["ctr"]["mean"] == pytest.approx(1 / 4)
    pos = {p["position"]: p for p in t["positions"]}
    assert pos[1]["impressions"] == 3 and pos[1]["ctr"] == pytest.approx(1 / 3)  # r4's p6 at position 1
    assert pos[2]["impressions"] == 1 and pos[2]["ctr"] == 0.0
    assert {p["position"]: p["ptr"] for p in c["positions"]} == {1: 0.0, 2: 1.0}
    assert rep["events"]["rows"] == 10 and rep["events"]["of_exposed_users"] == 9
    assert rep["control"] == "control" and "treatment" in rep["comparisons"]
    comp = rep["comparisons"]["treatment"]["conversion_any"]
    assert comp["diff"] == pytest.approx(0.5) and comp["lift"] == pytest.approx(1.0)
    b = c["metrics"]["revenue_per_user"]
    assert b["boot_ci_low"] <= b["mean"] <= b["boot_ci_high"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["variants"]["control"]["users"] == 2
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Sample ratio" in md and "`treatment` vs `control`" in md and "| 1 |" in md
    # a half-day window drops C's purchase (1 day after r4) and B's p4 (1 day after r2)
    rep2 = analyze(log, ev, window_days=0.5, ab=ab, n_boot=0)
    assert rep2["variants"]["treatment"]["metrics"]["conversion_any"]["mean"] == 0.0


def test_events_from_files_and_timestamp_formats(small, tmp_path):
    log, ev = small
    ref = analyze(log, ev, n_boot=0)
    parts = tmp_path / "raw" / "events"
    parts.mkdir(parents=True)
    iso = ev.assign(timestamp=pd.to_datetime(ev["timestamp"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    iso.iloc[:5].to_csv(parts / "part-0.csv", index=False)
    iso.iloc[5:].to_csv(parts / "part-1.csv", index=False)
    ts = ev.assign(timestamp=pd.to_datetime(ev["timestamp"], unit="s", utc=True))
    ts.to_parquet(tmp_path / "events.parquet", index=False)
    for src in (tmp_path / "raw", parts, tmp_path / "events.parquet"):
        rep = analyze(log, src, n_boot=0)
        assert rep["variants"] == ref["variants"], src
    with pytest.raises(ValueError, match="timestamp"):
        read_events(ev.drop(columns=["timestamp"]))
    assert read_events(ev.drop(columns=["event_type", "quantity"]))["event_type"].eq("purchase").all()
    # other logs' names for the event types and epoch milliseconds in a tab-separated file, as prepare reads them
    other = ev.assign(event_type=ev["event_type"].map({"purchase": "Transaction", "view": "page_view", "cart": "AddToCart"}),
                      timestamp=ev["timestamp"] * 1000)
    other.to_csv(tmp_path / "events.tsv", sep="\t", index=False)
    assert analyze(log, tmp_path / "events.tsv", n_boot=0)["variants"] == ref["variants"]


def test_users_in_two_variants_are_excluded_and_experiment_must_be_chosen(tmp_path):
    log = tmp_path / "log"
    with ExposureLogWriter(log, flush_interval_s=0) as w:
        w.log_exposure("r1", "A", "exp", "control", ["p1"], timestamp=T0)
        w.log_exposure("r2", "A", "exp", "treatment", ["p1"], timestamp=T0 + 1)
        w.log_exposure("r3", "B", "exp", "treatment", ["p1"], timestamp=T0)
        w.log_exposure("r4", "C", "exp", "control", ["p1"], timestamp=T0)
        w.log_exposure("r5", "C", "exp2", "x", ["p1"], timestamp=T0)
    ev = pd.DataFrame({"user_id": ["A"], "product_id": ["p1"], "event_type": ["purchase"], "timestamp": [T0 + 5]})
    with pytest.raises(ValueError, match="experiments"):
        analyze(log, ev, n_boot=0)
    rep = analyze(log, ev, experiment="exp", n_boot=0)
    assert rep["exposures"]["users_in_multiple_variants"] == 1 and rep["exposures"]["users"] == 2
    assert any("more than one variant" in n for n in rep["notes"])


def test_srm_check():
    ok = srm_check({"control": 1000, "treatment": 1010}, {"control": 0.5, "treatment": 0.5})
    assert not ok["flag"] and ok["p_value"] > 0.1
    bad = srm_check({"control": 1000, "treatment": 850}, {"control": 0.5, "treatment": 0.5})
    assert bad["flag"] and bad["p_value"] < 0.001
    skew = srm_check({"control": 900, "treatment": 100}, {"control": 0.9, "treatment": 0.1})
    assert not skew["flag"]
    assert srm_check({"control": 10, "x": 3}, {"control": 1.0})["flag"]  # an unexpected variant


def test_welch_and_attribution_helpers_match_references():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 300), rng.normal(0.2, 2, 200)
    assert _welch_p(a, b) == pytest.approx(stats.ttest_ind(b, a, equal_var=False).pvalue, rel=1e-9)
    # latest exposure at or before each event, same key, within the window
    ev_t = np.array([5, 10, 10, 30, 3, 50])
    ev_k = np.array(["a", "a", "b", "a", "a", "b"], dtype=object)
    ex_t = np.array([4, 10, 20, 9, 1])
    ex_k = np.array(["a", "a", "a", "b", "c"], dtype=object)
    e, x = _attribute([ev_k], ev_t, [ex_k], ex_t, window_ns=15)
    assert dict(zip(e.tolist(), x.tolist(), strict=True)) == {0: 0, 1: 1, 2: 3, 3: 2}


def test_planner_known_value_and_power_round_trip():
    plan = plan_sample_size(0.10, 0.10)  # 10% -> 11%, alpha 0.05, power 0.8
    assert plan["control"] == plan["treatment"] == plan["per_variant"] == 14751
    assert power_two_proportions(0.10, 0.11, 14751, 14751) == pytest.approx(0.8, abs=0.002)
    assert power_two_proportions(0.10, 0.11, 3000, 3000) < 0.3
    uneq = plan_sample_size(0.10, 0.10, allocation=(0.8, 0.2))
    assert uneq["treatment"] < uneq["control"] and uneq["total"] > plan["total"]
    assert power_two_proportions(0.10, 0.11, uneq["control"], uneq["treatment"]) == pytest.approx(0.8, abs=0.01)
    mde = minimum_detectable_lift(0.10, 14751, 14751)
    assert mde == pytest.approx(0.10, abs=0.002)
    with pytest.raises(ValueError):
        plan_sample_size(0.9, 0.5)
