"""The retrieval API (FastAPI TestClient and a loopback uvicorn server) and its httpx client."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from retrieval import bundle as bundle_mod
from retrieval import export, faiss_index
from retrieval.client import RetrievalClient, RetrievalClientError, swap_bundle
from retrieval.service import create_app
from tests.test_retrieval_support import make_run, tiny_cfg

MAX_K, MAX_BATCH = 50, 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    cfg = tiny_cfg(f"serve.max_k={MAX_K}", f"serve.max_batch_users={MAX_BATCH}")
    _, run = make_run(tmp, cfg)
    export.run(cfg, run)
    faiss_index.run(cfg, run)
    first = bundle_mod.build(cfg, run, version="v1")
    second = bundle_mod.build(cfg, run, version="v2", make_current=False)
    corrupt = tmp / "corrupt"
    shutil.copytree(second["path"], corrupt)
    (corrupt / "index" / "products.faiss").unlink()
    (corrupt / "index" / "products.faiss").write_bytes(b"garbage")
    return cfg, run, first["path"], second["path"], corrupt


@pytest.fixture(scope="module")
def client(world):
    cfg, run, *_ = world
    return TestClient(create_app(run, cfg), raise_server_exceptions=False)


def _check(r: httpx.Response, status: int = 200) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["request_id"] and r.headers["x-request-id"] == body["request_id"]
    assert "bundle_version" in body
    return body


def test_endpoints(client) -> None:
    body = _check(client.post("/v1/retrieve/products", json={"user_id": "u1", "k": 10,
                                                            "filters": {"in_stock": True, "max_per_seller": 2}}))
    assert body["bundle_version"] == "v1" and not body["fallback"] and len(body["candidates"]) == 10
    assert [c["rank"] for c in body["candidates"]] == list(range(1, 11))
    assert set(body["candidates"][0]) == {"product_id", "score", "rank", "seller_id", "price"}
    body = _check(client.post("/v1/retrieve/products", json={"recent_product_ids": ["p1", "p2"], "k": 5}))
    assert not body["fallback"] and len(body["candidates"]) == 5
    body = _check(client.post("/v1/retrieve/products", json={"user_id": "nobody", "k": 5,
                                                            "filters": {"categories": ["dept2"]}}))
    assert body["fallback"] and len(body["candidates"]) == 5
    body = _check(client.post("/v1/retrieve/products:batch", json={"user_ids": ["u1", "u2", "zz"], "k": 3}))
    assert [r["fallback"] for r in body["results"]] == [False, False, True]
    body = _check(client.post("/v1/retrieve/sellers", json={"user_id": "u1", "k": 3}))
    assert len(body["sellers"]) == 3
    body = _check(client.get("/v1/products/p7/sellers", params={"k": 2, "user_id": "u1"}))
    assert 1 <= len(body["sellers"]) <= 2 and "buy_box" in body["sellers"][0]
    body = _check(client.post("/v1/products/p7/sellers", json={"k": 3}))
    assert body["sellers"][0]["buy_box"]
    body = _check(client.post("/v1/products/p7/similar", json={"k": 4, "filters": {"min_price": 10}}))
    assert len(body["candidates"]) == 4 and "p7" not in [c["product_id"] for c in body["candidates"]]
    assert _check(client.get("/healthz"))["status"] == "ok"
    assert _check(client.get("/readyz"))["bundle_version"] == "v1"
    m = client.get("/metrics")
    assert m.status_code == 200 and 'recsys_requests_total{method="POST",route="/v1/retrieve/products",status="200"}' in m.text
    assert 'recsys_bundle_info{version="v1"} 1.0' in m.text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/retrieve/products", "/v1/retrieve/products:batch", "/admin/bundle"} <= set(paths)


def test_request_id_propagation(client) -> None:
    r = client.post("/v1/retrieve/products", json={"user_id": "u1", "k": 1}, headers={"X-Request-ID": "req-42"})
    assert _check(r)["request_id"] == "req-42"
    r = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert _check(r)["request_id"] != "bad id\twith spaces"
    r = client.post("/v1/retrieve/products", json={"k": 0}, headers={"X-Request-ID": "req-43"})
    assert _check(r, 422)["request_id"] == "req-43"


@pytest.mark.parametrize(
    "path,payload,field",
    [
        ("/v1/retrieve/products", {"user_id": "u1", "k": 0}, "body.k"),
        ("/v1/retrieve/products", {"user_id": "u1", "k": MAX_K + 1}, "body.k"),
        ("/v1/retrieve/products", {"user_id": "u1", "k": "many"}, "body.k"),
        ("/v1/retrieve/products", {"user_id": 123}, "body.user_id"),
        ("/v1/retrieve/products", {"user_id": "u1", "filters": {"colour": "red"}}, "body.filters.colour"),
        ("/v1/retrieve/products", {"user_id": "u1", "filters": {"in_stock": "perhaps"}}, "body.filters.in_stock"),
        ("/v1/retrieve/products", {"user_id": "u1", "filters": {"min_price": 9, "max_price": 1}}, "body.filters"),
        ("/v1/retrieve/products", {"user": "u1"}, "body.user"),
        ("/v1/retrieve/products:batch", {"user_ids": [f"u{i}" for i in range(MAX_BATCH + 1)]}, "body.user_ids"),
        ("/v1/retrieve/products:batch", {"user_ids": []}, "body.user_ids"),
        ("/v1/retrieve/sellers", {"k": -1}, "body.k"),
        ("/v1/products/p1/similar", {"k": 2, "filters": {"max_per_seller": -1}}, "body.filters.max_per_seller"),
        ("/admin/bundle", {}, "body.path"),
    ],
)
def test_validation_errors_are_4xx_naming_the_field(client, path, payload, field) -> None:
    body = _check(client.post(path, json=payload), 422)
    assert body["error"]["code"] == "invalid_request"
    assert field in [f["field"] for f in body["error"]["fields"]], body
    assert field in body["error"]["message"]


def test_other_client_errors(client) -> None:
    body = _check(client.get("/v1/products/p1/sellers", params={"k": 0}), 422)
    assert "query.k" in body["error"]["message"]
    r = client.post("/v1/retrieve/products", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    body = _check(client.post("/v1/products/nope/similar", json={"k": 2}), 404)
    assert "unknown product_id 'nope'" in body["error"]["message"]
    assert client.get("/v1/products/nope/sellers").status_code == 404
    assert _check(client.get("/v1/no/such/route"), 404)["error"]["code"] == "not_found"
    assert _check(client.get("/v1/retrieve/products"), 405)["error"]["code"] == "method_not_allowed"


def test_unexpected_errors_become_json_500(world) -> None:
    cfg, run, *_ = world
    app = create_app(run, cfg)
    live = app.state.service.live

    def boom(*a, **k):
        raise RuntimeError("kaput")

    object.__setattr__(live.retriever, "topk_products", boom)
    c = TestClient(app, raise_server_exceptions=False)
    r = c.post("/v1/retrieve/products", json={"user_id": "u1"}, headers={"X-Request-ID": "r500"})
    assert r.status_code == 500 and r.json()["request_id"] == "r500" and "kaput" not in r.text


def test_bundle_swap(world) -> None:
    cfg, run, v1, v2, corrupt = world
    c = TestClient(create_app(v1, cfg, admin_token="s3cret"), raise_server_exceptions=False)
    assert c.post("/admin/bundle", json={"path": str(v2)}).status_code == 403
    hdr = {"X-Admin-Token": "s3cret"}
    body = _check(c.post("/admin/bundle", json={"path": str(v2)}, headers=hdr))
    assert body["bundle_version"] == "v2" and body["previous_version"] == "v1"
    assert _check(c.post("/v1/retrieve/products", json={"user_id": "u1"}))["bundle_version"] == "v2"
    body = _check(c.post("/admin/bundle", json={"path": str(corrupt)}, headers=hdr), 409)
    assert body["error"]["code"] == "bundle_refused" and "checksum mismatch" in body["error"]["message"]
    assert "still serving v2" in body["error"]["message"]
    assert _check(c.post("/v1/retrieve/products", json={"user_id": "u1"}))["bundle_version"] == "v2"
    assert _check(c.post("/admin/bundle", json={"path": str(run / "nowhere")}, headers=hdr), 409)
    assert _check(c.get("/readyz"))["bundle_version"] == "v2"
    assert 'recsys_bundle_swaps_total{result="refused"} 2.0' in c.get("/metrics").text


def test_client_against_testclient(world) -> None:
    cfg, run, *_ = world
    tc = TestClient(create_app(run, cfg))
    c = RetrievalClient("http://testserver", timeout_s=5, retries=1, http_client=tc)
    out = c.retrieve_products(user_id="u1", k=5, filters={"in_stock": True}, request_id="cli-1")
    assert out["request_id"] == "cli-1" and len(out["candidates"]) == 5
    assert len(c.retrieve_products_batch(["u1", "u2"], k=2)["results"]) == 2
    assert c.retrieve_sellers(user_id="u1", k=2)["sellers"]
    assert c.product_sellers("p3", k=2)["product_id"] == "p3"
    assert len(c.similar_products("p3", k=3)["candidates"]) == 3
    assert c.readyz()["status"] == "ready" and c.healthz()["status"] == "ok"
    with pytest.raises(RetrievalClientError) as e:
        c.retrieve_products(user_id="u1", k=10_000)
    assert e.value.status == 422 and "body.k" in str(e.value)


def test_client_retries_5xx_and_connect_errors_with_one_request_id() -> None:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["x-request-id"])
        if len(seen) < 3:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        return httpx.Response(200, json={"ok": True})

    c = RetrievalClient("http://x", retries=2, backoff_s=0.001, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    assert c.retrieve_products(user_id="u1") == {"ok": True}
    assert len(seen) == 3 and len(set(seen)) == 1
    seen.clear()
    c = RetrievalClient("http://x", retries=1, backoff_s=0.001, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    with pytest.raises(RetrievalClientError, match="HTTP 503"):
        c.retrieve_products(user_id="u1")
    assert len(seen) == 2

    def refuse(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        raise httpx.ConnectError("refused", request=request)

    seen.clear()
    c = RetrievalClient("http://x", retries=2, backoff_s=0.001, http_client=httpx.Client(transport=httpx.MockTransport(refuse)))
    with pytest.raises(RetrievalClientError, match="ConnectError"):
        c.healthz()
    assert len(seen) == 3

    def bad(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        return httpx.Response(422, json={"error": {"message": "body.k: too big"}})

    seen.clear()
    c = RetrievalClient("http://x", retries=3, http_client=httpx.Client(transport=httpx.MockTransport(bad)))
    with pytest.raises(RetrievalClientError, match="body.k"):
        c.retrieve_products(k=10_000)
    assert len(seen) == 1  # 4xx is not retried


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_swap_under_load_on_a_live_server_has_no_failed_requests(world) -> None:
    import uvicorn

    cfg, run, v1, v2, corrupt = world
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(v1, cfg), host="127.0.0.1", port=port, log_level="error",
                                           access_log=False))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    stop = threading.Event()
    results: list[tuple[int, str]] = []

    def hammer() -> None:
        with httpx.Client(timeout=5) as h:
            rng = np.random.default_rng(0)
            while not stop.is_set():
                r = h.post(url + "/v1/retrieve/products",
                           json={"user_id": f"u{int(rng.integers(1, 300))}", "k": 20, "filters": {"in_stock": True}})
                results.append((r.status_code, r.json().get("bundle_version")))

    workers = [threading.Thread(target=hammer) for _ in range(2)]
    try:
        for w in workers:
            w.start()
        time.sleep(0.3)
        assert swap_bundle(url, str(v2))["bundle_version"] == "v2"
        time.sleep(0.2)
        with pytest.raises(RetrievalClientError) as e:
            swap_bundle(url, str(corrupt))
        assert e.value.status == 409
        time.sleep(0.2)
        assert swap_bundle(url, str(v1))["bundle_version"] == "v1"
        time.sleep(0.2)
    finally:
        stop.set()
        for w in workers:
            w.join(10)
        server.should_exit = True
        th.join(10)
    assert len(results) > 20
    assert all(s == 200 for s, _ in results), [s for s, _ in results if s != 200][:5]
    versions = [v for _, v in results]
    assert {"v1", "v2"} <= set(versions)


def test_ab_variants_serve_their_bundles_and_log_exposures(world, tmp_path) -> None:
    from recsys.ab.assignment import Assigner
    from recsys.ab.exposure_log import read_exposures

    _, run, _, second, _ = world
    log_dir = tmp_path / "exposures"
    cfg = tiny_cfg(f"serve.max_k={MAX_K}", f"serve.max_batch_users={MAX_BATCH}", "ab.experiment=exp1",
                   f"ab.variants=[{{name: control, weight: 1}}, {{name: treatment, weight: 1, bundle: '{second}'}}]",
                   f"serve.exposure_log={log_dir}")
    users = [f"u{i}" for i in range(1, 41)]
    expected = dict(zip(users, Assigner.from_config(cfg.ab).assign_many(users).tolist(), strict=True))
    assert set(expected.values()) == {"control", "treatment"}
    with TestClient(create_app(run, cfg), raise_server_exceptions=False) as c:
        for u in users:
            r = c.post("/v1/retrieve/products", json={"user_id": u, "k": 5}, headers={"X-Request-ID": f"r-{u}"})
            body = _check(r)
            assert (body["experiment"], body["variant"]) == ("exp1", expected[u])
            assert r.headers["x-variant"] == expected[u]
            assert body["bundle_version"] == {"control": "v1", "treatment": "v2"}[expected[u]]
            assert r.headers["x-bundle-version"] == body["bundle_version"]
        batch = _check(c.post("/v1/retrieve/products:batch", json={"user_ids": users[:4], "k": 3}))["results"]
        assert [x["variant"] for x in batch] == [expected[u] for u in users[:4]]
        assert [x["bundle_version"] for x in batch] == [{"control": "v1", "treatment": "v2"}[expected[u]] for u in users[:4]]
        # the ranking service logs what it shows itself
        _check(c.post("/v1/retrieve/products", json={"user_id": "u1", "k": 5}, headers={"X-Recsys-Caller": "ranking"}))
        # a variant's bundle is swapped on its own; unknown variants are refused
        swapped = _check(c.post("/admin/bundle", json={"path": str(second), "variant": "treatment"}))
        assert swapped["variant"] == "treatment" and _check(c.get("/readyz"))["bundle_version"] == "v1"
        assert _check(c.post("/admin/bundle", json={"path": str(second), "variant": "nope"}), 422)
    df = read_exposures(log_dir)
    heads = df.drop_duplicates("request_id")
    assert len(heads) == len(users) + 4  # 40 single requests + 4 batch rows, none for the ranking caller
    single = heads[heads.request_id.str.startswith("r-")]
    assert dict(zip(single.user_id, single.variant, strict=True)) == expected
    assert (df[df.request_id == "r-u1"].position.tolist()) == [1, 2, 3, 4, 5]
    assert set(single.bundle_version) == {"v1", "v2"}
