"""The ranking API with test doubles: endpoints, request ids, fallbacks (ranker failure / timeout), 4xx."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from ranking.scorer import Ranked, UnknownProductError
from ranking.service import create_app
from recsys.config import load_config
from retrieval.client import RetrievalClientError

CANDS = [{"product_id": f"p{i}", "seller_id": f"s{i % 3}", "score": 1.0 - i / 10, "rank": i + 1, "price": 10.0 + i}
         for i in range(6)]


class FakeRanker:
    """Reverses the input order (so ranked and fallback orders differ); can fail or stall."""

    version = "ranker-v1"
    bundle_version = "bundle-v1"

    def __init__(self, mode: str = "ok", delay: float = 0.0):
        self.mode = mode
        self.delay = delay
        self.calls: list[tuple] = []

    def rank_detailed(self, user_id, candidates, context=None, expand_offers=None):
        self.calls.append((user_id, len(candidates), context, expand_offers))
        if self.delay:
            time.sleep(self.delay)
        if self.mode == "error":
            raise RuntimeError("model exploded")
        n = len(candidates)
        return [Ranked(str(candidates[i]["product_id"]), "s-best", float(i), i, 9.5) for i in reversed(range(n))]

    def best_sellers(self, product_id, user_id=None, k=10, context=None):
        if product_id == "nope":
            raise UnknownProductError(f"unknown product_id {product_id!r}")
        return [{"seller_id": "s1", "rank": 1, "score": 0.9, "price": 9.0}, {"seller_id": "s2", "rank": 2, "score": 0.1,
                                                                             "price": 8.0}][:k]


class FakeRetrieval:
    def __init__(self, fail: RetrievalClientError | None = None, variant: str | None = None):
        self.fail = fail
        self.variant = variant
        self.calls: list[dict] = []

    def retrieve_products(self, user_id=None, k=100, filters=None, recent_product_ids=None, request_id=None):
        self.calls.append({"user_id": user_id, "k": k, "filters": filters, "recent": recent_product_ids,
                           "request_id": request_id})
        if self.fail is not None:
            raise self.fail
        out = {"user_id": user_id, "fallback": False, "bundle_version": "bundle-v7", "candidates": CANDS[:k],
               "request_id": request_id}
        if self.variant:
            out.update(experiment="exp1", variant=self.variant)
        return out

    def request(self, method, path, **kw):
        if self.fail is not None:
            raise self.fail
        return {"status": "ready"}


def client(ranker=None, retrieval=None, *overrides: str) -> TestClient:
    cfg = load_config(None, ["serve.ranker_timeout_s=0.2", "serve.max_k=50", *overrides])
    return TestClient(create_app(ranker or FakeRanker(), cfg, retrieval if retrieval is not None else FakeRetrieval()))


def test_rank_orders_candidates_and_echoes_request_id() -> None:
    fr = FakeRanker()
    c = client(fr)
    r = c.post("/v1/rank", json={"user_id": "u1", "candidates": CANDS, "context": {"hour": 5, "dow": 2}, "k": 4},
               headers={"X-Request-ID": "req-42"})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["request_id"] == "req-42" and r.headers["x-request-id"] == "req-42"
    assert b["ranker_version"] == "ranker-v1" and r.headers["x-ranker-version"] == "ranker-v1"
    assert b["fallback"] is None
    assert [i["product_id"] for i in b["items"]] == ["p5", "p4", "p3", "p2"]
    assert [i["input_rank"] for i in b["items"]] == [6, 5, 4, 3]
    assert fr.calls[0][2] == {"hour": 5, "dow": 2}
    bad_id = c.post("/v1/rank", json={"candidates": CANDS[:1]}, headers={"X-Request-ID": "bad id with spaces"})
    assert bad_id.json()["request_id"] != "bad id with spaces" and len(bad_id.json()["request_id"]) == 32


@pytest.mark.parametrize(
    "body, field",
    [
        ({"candidates": []}, "candidates"),
        ({"candidates": [{"seller_id": "s1"}]}, "product_id"),
        ({"candidates": CANDS, "context": {"hour": 24}}, "hour"),
        ({"candidates": CANDS, "surprise": 1}, "surprise"),
        ({"candidates": [{"product_id": f"p{i}"} for i in range(51)]}, "candidates"),
        ({"candidates": CANDS, "k": 0}, "k"),
    ],
)
def test_rank_validation_is_422_naming_the_field(body, field) -> None:
    r = client().post("/v1/rank", json=body)
    assert r.status_code == 422
    e = r.json()["error"]
    assert e["code"] == "invalid_request" and any(field in f["field"] for f in e["fields"]), e


def test_recommend_end_to_end_propagates_ids_and_versions() -> None:
    ret = FakeRetrieval()
    fr = FakeRanker()
    c = client(fr, ret, "ranking.candidates=6")
    r = c.post("/v1/recommend", json={"user_id": "u9", "k": 3, "filters": {"in_stock": True}},
               headers={"X-Request-ID": "abc-123"})
    assert r.status_code == 200, r.text
    b = r.json()
    assert ret.calls[0] == {"user_id": "u9", "k": 6, "filters": {"in_stock": True}, "recent": None,
                            "request_id": "abc-123"}
    assert b["bundle_version"] == "bundle-v7" and r.headers["x-bundle-version"] == "bundle-v7"
    assert b["ranker_version"] == "ranker-v1" and b["fallback"] is None and b["request_id"] == "abc-123"
    assert [i["product_id"] for i in b["items"]] == ["p5", "p4", "p3"]
    assert b["items"][0]["retrieval_rank"] == 6 and b["items"][0]["seller_id"] == "s-best"
    assert fr.calls[0][3] is True  # recommend lets the ranker pick each product's best offer


def test_recommend_logs_what_it_shows_with_the_variant(tmp_path) -> None:
    from recsys.ab.exposure_log import read_exposures

    log_dir = tmp_path / "exp"
    with client(FakeRanker(), FakeRetrieval(variant="treatment"), "ranking.candidates=6",
                f"serve.exposure_log={log_dir}") as c:
        b = c.post("/v1/recommend", json={"user_id": "u9", "k": 3}, headers={"X-Request-ID": "abc-1"}).json()
        assert (b["experiment"], b["variant"]) == ("exp1", "treatment")
    df = read_exposures(log_dir)
    assert (log_dir / "ranking").is_dir()
    assert df.product_id.tolist() == ["p5", "p4", "p3"] and df.position.tolist() == [1, 2, 3]
    assert set(df.request_id) == {"abc-1"} and set(df.variant) == {"treatment"} and set(df.experiment) == {"exp1"}
    assert set(df.ranker_version) == {"ranker-v1"} and set(df.bundle_version) == {"bundle-v7"}


def test_each_variant_is_ranked_by_its_own_ranker() -> None:
    from recsys.ab.assignment import Assigner

    cfg = load_config(None, ["serve.max_k=50", "ranking.candidates=6", "ab.experiment=exp1",
                             "ab.variants=[{name: control, weight: 1}, {name: treatment, weight: 1}]"])
    treat = FakeRanker()
    treat.version = "ranker-v2"
    c = TestClient(create_app(FakeRanker(), cfg, FakeRetrieval(variant="treatment"), variant_rankers={"treatment": treat}))
    r = c.post("/v1/recommend", json={"user_id": "u9", "k": 3})
    assert r.json()["ranker_version"] == "ranker-v2" and r.headers["x-ranker-version"] == "ranker-v2"
    assert r.headers["x-variant"] == "treatment" and len(treat.calls) == 1
    # /v1/rank assigns the user itself, with the same salted hash as retrieval
    users = [f"u{i}" for i in range(20)]
    want = Assigner.from_config(cfg.ab).assign_many(users).tolist()
    got = [c.post("/v1/rank", json={"user_id": u, "candidates": CANDS}).json() for u in users]
    assert [b["variant"] for b in got] == want
    assert [b["ranker_version"] for b in got] == ["ranker-v2" if v == "treatment" else "ranker-v1" for v in want]


@pytest.mark.parametrize("ranker", [FakeRanker("error"), FakeRanker(delay=1.0)], ids=["failure", "timeout"])
def test_recommend_falls_back_to_retrieval_order(ranker) -> None:
    c = client(ranker)
    t0 = time.perf_counter()
    r = c.post("/v1/recommend", json={"user_id": "u1", "k": 4})
    took = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["fallback"] == "retrieval_order" and b["fallback_reason"] == ("error" if ranker.mode == "error" else "timeout")
    assert [i["product_id"] for i in b["items"]] == ["p0", "p1", "p2", "p3"]
    assert b["items"][0]["seller_id"] == "s0" and b["items"][0]["price"] == 10.0
    assert b["bundle_version"] == "bundle-v7" and b["ranker_version"] == "ranker-v1"
    assert took < 0.9  # the deadline (0.2 s) bounds the wait, not the stalled ranker
    rank = c.post("/v1/rank", json={"candidates": CANDS[:3]}).json()
    assert rank["fallback"] == "input_order" and [i["product_id"] for i in rank["items"]] == ["p0", "p1", "p2"]
    metrics = c.get("/metrics").text
    assert "ranking_fallback_total" in metrics and 'route="/v1/recommend"' in metrics


def test_recommend_retrieval_errors() -> None:
    rejected = RetrievalClientError("HTTP 422", 422, {"error": {"code": "invalid_request", "message": "filters.x: extra",
                                                               "fields": [{"field": "body.filters.x", "message": "extra"}]}})
    r = client(retrieval=FakeRetrieval(rejected)).post("/v1/recommend", json={"filters": {"x": 1}})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "body.filters.x"
    down = RetrievalClientError("connect failed (after 3 attempts)", None, None)
    r = client(retrieval=FakeRetrieval(down)).post("/v1/recommend", json={"user_id": "u1"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "retrieval_unavailable"
    assert client(retrieval=FakeRetrieval(down)).get("/readyz").json()["retrieval"] == "unavailable"
    r = client().post("/v1/recommend", json={"k": 0})
    assert r.status_code == 422


def test_best_sellers_health_ready_and_metrics() -> None:
    c = client()
    r = c.get("/v1/products/p1/best-sellers", params={"user_id": "u1", "k": 1})
    assert r.status_code == 200 and [s["seller_id"] for s in r.json()["sellers"]] == ["s1"]
    assert c.get("/v1/products/nope/best-sellers").status_code == 404
    assert c.get("/v1/products/p1/best-sellers", params={"k": 0}).status_code == 422
    assert c.get("/healthz").json()["status"] == "ok"
    ready = c.get("/readyz").json()
    assert ready["status"] == "ready" and ready["retrieval"] == "ok" and ready["ranker_bundle_version"] == "bundle-v1"
    m = c.get("/metrics")
    assert m.status_code == 200 and "ranking_requests_total" in m.text


def test_crash_is_json_500_with_request_id() -> None:
    broken = FakeRanker()
    broken.best_sellers = lambda *a, **k: (_ for _ in ()).throw(ValueError("boom"))
    c = TestClient(create_app(broken, load_config(None, []), SimpleNamespace()), raise_server_exceptions=False)
    r = c.get("/v1/products/p1/best-sellers", headers={"X-Request-ID": "r-1"})
    assert r.status_code == 500 and r.json()["request_id"] == "r-1" and r.json()["error"]["code"] == "internal"
