"""Exposure log: round trip, rotation, thread safety, crash recovery, the one-writer lock, the router."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from recsys.ab.exposure_log import (
    ExposureLogError,
    ExposureLogWriter,
    VariantRouter,
    iter_records,
    read_exposures,
)
from recsys.config import ABConfig, ABVariant, ConfigError


@dataclass(frozen=True)
class Cand:  # the shape of retrieval.retriever.Candidate
    product_id: str
    seller_id: str | None
    score: float = 0.0


def _files(d: Path) -> list[Path]:
    return sorted(d.glob("exposures-*.jsonl"))


def test_round_trip(tmp_path):
    with ExposureLogWriter(tmp_path, flush_interval_s=0) as w:
        w.log_exposure("r1", "u1", "exp", "control", [Cand("p1", "s1"), {"product_id": "p2", "seller_id": None}],
                       bundle_version={"products": "b1", "sellers": "b1"}, ranker_version="rk1", timestamp=1_700_000_000.5)
        w.log_exposure("r2", "u2", "exp", "treatment", ["p3"], bundle_version="b2", timestamp=1_700_000_100)
        w.log_exposure("r3", "u3", "exp", "treatment", [], timestamp=1_700_000_200)
        w.log_exposure("r4", "u4", "other", "x", ["p9"], timestamp=1_700_000_300)
    lines = _files(tmp_path)[0].read_text().splitlines()
    rec = json.loads(lines[0])
    assert rec["items"] == [{"product_id": "p1", "seller_id": "s1", "position": 1},
                            {"product_id": "p2", "seller_id": None, "position": 2}]
    assert rec["bundle_version"] == {"products": "b1", "sellers": "b1"} and rec["ranker_version"] == "rk1"
    df = read_exposures(tmp_path, experiment="exp")
    assert list(df.columns) == ["request_id", "user_id", "experiment", "variant", "timestamp", "position",
                                "product_id", "seller_id", "bundle_version", "ranker_version"]
    assert len(df) == 4  # two items, one item, one empty response kept as position 0
    assert df["position"].tolist() == [1, 2, 1, 0]
    assert df["product_id"].tolist() == ["p1", "p2", "p3", None]
    assert str(df["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert df["timestamp"].iloc[0].timestamp() == 1_700_000_000.5
    assert json.loads(df["bundle_version"].iloc[0]) == {"products": "b1", "sellers": "b1"}
    assert len(read_exposures(tmp_path)) == 5


def test_rotation_threads_and_order(tmp_path):
    rotate_mb = 8 / 1024  # 8 KiB files
    n_threads, per_thread = 6, 300
    w = ExposureLogWriter(tmp_path, rotate_mb=rotate_mb, batch_lines=7, flush_interval_s=0.01)

    def work(t: int) -> None:
        for i in range(per_thread):
            w.log_exposure(f"t{t}-{i}", f"u{t}", "exp", "control", [f"p{i}", f"p{i + 1}"], timestamp=float(i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    files = _files(tmp_path)
    assert len(files) > 5
    for f in files:
        data = f.read_bytes()
        assert data.endswith(b"\n") and len(data) <= 8 * 1024
    recs = list(iter_records(tmp_path))
    assert len(recs) == n_threads * per_thread == w.lines_written
    for t in range(n_threads):  # each thread's lines keep their order across files
        seq = [int(r["request_id"].split("-")[1]) for r in recs if r["user_id"] == f"u{t}"]
        assert seq == list(range(per_thread))
    with pytest.raises(ExposureLogError, match="closed"):
        w.log_exposure("late", "u", "exp", "control", [])


def test_background_flush_makes_lines_durable_without_close(tmp_path):
    w = ExposureLogWriter(tmp_path, batch_lines=1000, flush_interval_s=0.02)
    try:
        w.log_exposure("r1", "u1", "exp", "control", ["p1"])
        deadline = time.time() + 5
        while time.time() < deadline and not (_files(tmp_path) and _files(tmp_path)[0].stat().st_size):
            time.sleep(0.01)
        assert len(list(iter_records(tmp_path))) == 1
    finally:
        w.close()


@pytest.mark.parametrize("tail", [b'{"v": 1, "request_id": "r9", "user_id": "u9", "it', b"\x00" * 4096,
                                  b'{"broken json"}\n'])
def test_crash_tail_is_moved_aside_and_never_appended_to(tmp_path, tail):
    with ExposureLogWriter(tmp_path, flush_interval_s=0) as w:
        for i in range(5):
            w.log_exposure(f"r{i}", f"u{i}", "exp", "control", ["p1"])
    f0 = _files(tmp_path)[0]
    good = f0.read_bytes()
    with open(f0, "ab") as f:  # what a crash in the middle of a write leaves behind
        f.write(tail)
    w2 = ExposureLogWriter(tmp_path, flush_interval_s=0)
    w2.log_exposure("r5", "u5", "exp", "control", ["p2"])
    w2.close()
    assert f0.read_bytes() == good  # truncated back to the last complete line
    aside = list(tmp_path.glob("exposures-00000.jsonl.partial-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == tail
    assert w2.recovered == aside
    files = _files(tmp_path)
    assert [p.name for p in files] == ["exposures-00000.jsonl", "exposures-00001.jsonl"]  # new session, new file
    df = read_exposures(tmp_path)
    assert df["request_id"].tolist() == [f"r{i}" for i in range(6)] and df.attrs["bad_lines"] == 0


def test_failed_write_is_retried(tmp_path, monkeypatch):
    w = ExposureLogWriter(tmp_path, flush_interval_s=0)
    w.log_exposure("r1", "u1", "exp", "control", ["p1"])
    real = w._write
    monkeypatch.setattr(w, "_write", lambda lines: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        w.flush()
    monkeypatch.setattr(w, "_write", real)
    w.close()
    assert [r["request_id"] for r in iter_records(tmp_path)] == ["r1"]


def test_reader_skips_and_counts_bad_lines(tmp_path):
    (tmp_path / "exposures-00000.jsonl").write_text(
        json.dumps({"request_id": "a", "user_id": "u1", "experiment": "e", "variant": "v", "timestamp": 1,
                    "items": [{"product_id": "p", "seller_id": None, "position": 1}]}) + "\nnot json\n[1, 2]\n")
    df = read_exposures(tmp_path)
    assert len(df) == 1 and df.attrs["bad_lines"] == 2


def test_one_writer_per_directory(tmp_path):
    w = ExposureLogWriter(tmp_path, flush_interval_s=0)
    try:
        with pytest.raises(ExposureLogError, match="another exposure log writer"):
            ExposureLogWriter(tmp_path, flush_interval_s=0)
    finally:
        w.close()
    ExposureLogWriter(tmp_path, flush_interval_s=0).close()  # free again after close


@dataclass(frozen=True)
class Result:  # the shape of retrieval.retriever.RetrievalResult
    user_id: str
    candidates: list[Cand]
    fallback: bool = False


def test_variant_router(tmp_path):
    ab = ABConfig(experiment="exp", salt="s", variants=(ABVariant("control", 1, "b1"), ABVariant("treatment", 1, "b2")))
    handlers = {"control": "retriever-A", "treatment": "retriever-B"}
    router = VariantRouter.from_config(ab, handlers, log_dir=tmp_path / "log", rotate_mb=1, flush_interval_s=0)
    seen = {}
    for i in range(200):
        uid = f"u{i}"
        route, res = router.handle(uid, lambda h, uid=uid: Result(uid, [Cand(f"{h}-p1", "s1"), Cand(f"{h}-p2", None)]),
                                   request_id=f"r{i}", bundle_version="bv", ranker_version="rv")
        assert route.handler == handlers[route.variant] and route.experiment == "exp"
        assert router.route(uid).variant == route.variant  # sticky
        seen[uid] = route.variant
    router.close()
    assert set(seen.values()) == {"control", "treatment"}
    df = read_exposures(tmp_path / "log")
    assert len(df) == 400 and set(df["ranker_version"]) == {"rv"}
    by_user = df.groupby("user_id")["variant"].first().to_dict()
    assert by_user == seen
    assert all(p.startswith(handlers[v]) for p, v in zip(df["product_id"], df["variant"], strict=True))


def test_router_without_experiment_and_validation(tmp_path):
    r = VariantRouter(ABConfig(), {"control": 1})
    assert r.route("u1").variant == "control" and r.route("u1").experiment == ""
    assert r.record(r.route("u1"), "u1", ["p"]) is None  # no log
    logged = VariantRouter(ABConfig(), {"control": 1}, ExposureLogWriter(tmp_path, flush_interval_s=0))
    assert logged.record(logged.route("u1"), "u1", [{"seller_id": "s1"}]) is None  # bad item: logged, not raised
    assert logged.log_errors == 1
    assert logged.record(logged.route("u1"), "u1", ["p1"])["experiment"] == ""
    logged.close()
    assert read_exposures(tmp_path)["product_id"].tolist() == ["p1"]
    ab = ABConfig(experiment="exp", variants=(ABVariant("control", 1), ABVariant("treatment", 1)))
    with pytest.raises(ConfigError, match="no handler"):
        VariantRouter(ab, {"control": 1})
