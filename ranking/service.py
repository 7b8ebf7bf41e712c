"""The ranking HTTP API (FastAPI): ``create_app(ranker, cfg, retrieval)`` and ``serve(cfg, run_dir, url)``.

Endpoints (OpenAPI at ``/openapi.json``)::

    POST /v1/rank        {user_id?, candidates: [{product_id, seller_id?, score?, rank?}], context?,
                          expand_offers?, k?}                 -> the candidates ordered by the ranker
    POST /v1/recommend   {user_id?, recent_product_ids?, k, candidates?, filters?, context?, expand_offers?}
                         retrieval over HTTP (``retrieval.client.RetrievalClient``), then the ranker
    GET  /v1/products/{product_id}/best-sellers?user_id=&k=&hour=&dow=   the product's offers ranked
    GET  /healthz   GET /readyz   GET /metrics (Prometheus)

Every response carries ``request_id`` (the incoming ``X-Request-ID`` when it is a sane token, else a
new one; echoed as a header and sent on to the retrieval service) and ``ranker_version`` (header
``X-Ranker-Version``); ``/v1/recommend`` also ``bundle_version`` (the retrieval bundle that answered,
header ``X-Bundle-Version``) and, while an A/B experiment runs, the ``experiment`` and ``variant`` that
retrieval assigned. With ``serve.exposure_log`` set, ``/v1/recommend`` appends what it returns to the
exposure log (sub-directory ``ranking/``; the retrieval service then does not log the same request).

Fallback: the ranker runs in a small thread pool with a deadline of ``serve.ranker_timeout_s``; if
it fails or misses the deadline, ``/v1/recommend`` returns retrieval's order (``"fallback":
"retrieval_order"``) and ``/v1/rank`` the input order (``"fallback": "input_order"``), with the
reason in ``fallback_reason``. A retrieval error that is the client's fault (4xx) is passed on with
its status; an unreachable retrieval service is a 503. Invalid input is a 422 naming the fields.
"""


import contextlib
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.datastructures import MutableHeaders

from recsys.config import Config
from retrieval.common import request_id_from_scope
from retrieval.json_response import JSONResponse

log = logging.getLogger(__name__)
BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ranking_requests_total", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram("ranking_request_seconds", "Request latency", ["route"], registry=r, buckets=BUCKETS)
        self.ranker = Histogram("ranking_ranker_seconds", "Ranker forward latency", registry=r, buckets=BUCKETS)
        self.retrieval = Histogram("ranking_retrieval_seconds", "Retrieval call latency", registry=r, buckets=BUCKETS)
        self.fallback = Counter("ranking_fallback_total", "Responses in fallback order", ["route", "reason"], registry=r)
        self.retrieval_errors = Counter("ranking_retrieval_errors_total", "Failed retrieval calls", ["kind"], registry=r)


class RequestContext:
    """Pure ASGI middleware: request id, version headers, latency metrics, JSON 500 on crashes."""

    def __init__(self, app, version: str, metrics: Metrics):
        self.app = app
        self.version = version
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from_scope(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        t0 = time.perf_counter()
        status = [500]
        started = [False]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                started[0] = True
                status[0] = message["status"]
                h = MutableHeaders(scope=message)
                h["x-request-id"] = rid
                h["x-ranker-version"] = str(state.get("ranker_version") or self.version)
                if state.get("variant"):
                    h["x-experiment"] = str(state.get("experiment", ""))
                    h["x-variant"] = str(state["variant"])
                if state.get("bundle_version"):
                    h["x-bundle-version"] = str(state["bundle_version"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:  # noqa: BLE001 - never drop a connection or leak a traceback
            log.exception("unhandled error (request %s)", rid)
            if not started[0]:
                resp = JSONResponse({"error": {"code": "internal", "message": "internal error; see the server log"},
                                     "request_id": rid, "ranker_version": self.version}, status_code=500)
                await resp(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(name, scope.get("method", ""), str(status[0])).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - t0)


def _rid(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex


def create_app(ranker, cfg: Config, retrieval=None, workers: int = 2, threads: int | None = 1,
               variant_rankers: dict[str, Any] | None = None) -> FastAPI:
    """The ranking API.

    Args:
        ranker: a loaded :class:`ranking.scorer.Ranker` (anything with ``rank_detailed``,
            ``best_sellers``, ``version`` and ``bundle_version`` works, e.g. a test double).
        cfg: resolved configuration (``serve`` limits and timeouts, ``ranking.candidates``).
        retrieval: a :class:`retrieval.client.RetrievalClient`, a retrieval base URL, or None
            (``/v1/recommend`` then answers 503).
        workers: threads that run the ranker (its deadline covers the wait for one).
        threads: torch intra-op threads (1 suits many concurrent small requests); None keeps them.
        variant_rankers: A/B variant name -> ranker for the variants with their own ranker
            (``ab.variants[].ranker``); the others use ``ranker``. ``/v1/recommend`` takes the variant
            that retrieval assigned, ``/v1/rank`` assigns the user itself (same salted hash).
    """
    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))
    if isinstance(retrieval, (str, Path)):
        from retrieval.client import RetrievalClient

        retrieval = RetrievalClient(str(retrieval), timeout_s=cfg.serve.request_timeout_s, retries=cfg.serve.retries,
                                    caller="ranking")
    sv = cfg.serve
    max_k = int(sv.max_k)
    timeout_s = float(sv.ranker_timeout_s)
    n_cand = int(min(cfg.ranking.candidates, max_k))
    metrics = Metrics()
    pool = ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="ranker")
    version = str(getattr(ranker, "version", "unknown"))
    variant_rankers = dict(variant_rankers or {})
    assigner = None
    if cfg.ab.experiment and cfg.ab.variants:
        from recsys.ab.assignment import Assigner

        assigner = Assigner.from_config(cfg.ab)

    def ranker_for(variant: str | None, request: Request):
        rk = variant_rankers.get(variant or "", ranker)
        ver = str(getattr(rk, "version", "unknown"))
        request.scope.setdefault("state", {})["ranker_version"] = ver
        return rk, ver

    exposures = None
    if sv.exposure_log:
        from recsys.ab.exposure_log import ExposureLogWriter

        exposures = ExposureLogWriter(Path(sv.exposure_log) / "ranking", rotate_mb=sv.exposure_rotate_mb)
    exposure_errors = [0]

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class CandidateIn(Strict):
        product_id: str = Field(min_length=1, max_length=256)
        seller_id: str | None = Field(default=None, max_length=256)
        score: float | None = None
        rank: int | None = Field(default=None, ge=1)
        price: float | None = None

        @field_validator("score")
        @classmethod
        def _finite(cls, v: float | None) -> float | None:
            if v is not None and not math.isfinite(v):
                raise ValueError("score must be a finite number")
            return v

    class ContextIn(Strict):
        hour: int | None = Field(default=None, ge=0, le=23)
        dow: int | None = Field(default=None, ge=0, le=6)

    class RankIn(Strict):
        user_id: str | None = Field(default=None, max_length=256)
        candidates: list[CandidateIn] = Field(min_length=1, max_length=max_k)
        context: ContextIn = Field(default_factory=ContextIn)
        expand_offers: bool | None = None
        k: int | None = Field(default=None, ge=1, le=max_k)

    class RecommendIn(Strict):
        user_id: str | None = Field(default=None, max_length=256)
        recent_product_ids: list[str] = Field(default_factory=list, max_length=int(sv.max_history))
        k: int = Field(default=10, ge=1, le=max_k)
        candidates: int = Field(default=n_cand, ge=1, le=max_k)
        filters: dict[str, Any] | None = None
        context: ContextIn = Field(default_factory=ContextIn)
        expand_offers: bool = True

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        pool.shutdown(wait=False, cancel_futures=True)
        if exposures is not None:
            exposures.close()

    app = FastAPI(title="recsys ranking", version="1", lifespan=lifespan, default_response_class=JSONResponse,
                  description="DCN-v2 re-ranking of retrieved candidates, end-to-end recommendations and best-seller ranking.")
    app.state.metrics = metrics
    app.state.pool = pool
    app.state.ranker = ranker
    app.add_middleware(RequestContext, version=version, metrics=metrics)

    def error(status: int, code: str, message: str, request: Request, fields=None) -> JSONResponse:
        body: dict[str, Any] = {"error": {"code": code, "message": message}}
        if fields is not None:
            body["error"]["fields"] = fields
        body["request_id"] = _rid(request)
        body["ranker_version"] = version
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [{"field": ".".join(str(x) for x in e.get("loc", ())), "message": str(e.get("msg", "invalid"))}
                  for e in exc.errors()]
        msg = "; ".join(f"{f['field']}: {f['message']}" for f in fields) or "invalid request"
        return error(422, "invalid_request", f"invalid request: {msg}", request, fields)

    def run_ranker(rk, route: str, *args) -> tuple[list | None, str | None]:
        """(ranked items, None) or (None, fallback reason) within the deadline."""
        t0 = time.perf_counter()
        fut = pool.submit(rk.rank_detailed, *args)
        try:
            items = fut.result(timeout=timeout_s)
        except FutureTimeout:
            fut.cancel()
            metrics.fallback.labels(route, "timeout").inc()
            log.warning("ranker missed its %.0f ms deadline; serving the fallback order", 1000 * timeout_s)
            return None, "timeout"
        except Exception:  # noqa: BLE001 - any ranker failure falls back, the request still succeeds
            log.exception("ranker failed; serving the fallback order")
            metrics.fallback.labels(route, "error").inc()
            return None, "error"
        metrics.ranker.observe(time.perf_counter() - t0)
        return items, None

    @app.post("/v1/rank", tags=["rank"], summary="Order candidates for a user")
    def rank(req: RankIn, request: Request) -> JSONResponse:
        cands = [c.model_dump() for c in req.candidates]
        variant = assigner.assign(req.user_id) if assigner is not None and req.user_id is not None else None
        rk, ver = ranker_for(variant, request)
        items, reason = run_ranker(rk, "/v1/rank", req.user_id, cands, req.context.model_dump(), req.expand_offers)
        k = req.k or len(cands)
        if items is None:
            out = [{"product_id": c["product_id"], "seller_id": c["seller_id"], "score": c["score"], "rank": i + 1,
                    "input_rank": i + 1} for i, c in enumerate(cands[:k])]
        else:
            out = [{"product_id": r.product_id, "seller_id": r.seller_id,
                    "score": r.score if math.isfinite(r.score) else None, "rank": j + 1, "input_rank": r.position + 1}
                   for j, r in enumerate(items[:k])]
        body = {"request_id": _rid(request), "ranker_version": ver, "user_id": req.user_id,
                "fallback": None if items is not None else "input_order", "fallback_reason": reason, "items": out}
        if variant is not None:
            body["experiment"], body["variant"] = cfg.ab.experiment, variant
            request.scope["state"].update(experiment=cfg.ab.experiment, variant=variant)
        return JSONResponse(body)

    @app.post("/v1/recommend", tags=["rank"], summary="Retrieve (over HTTP) then rank: end-to-end recommendations")
    def recommend(req: RecommendIn, request: Request) -> JSONResponse:
        from retrieval.client import RetrievalClientError

        rid = _rid(request)
        if retrieval is None:
            return error(503, "retrieval_unavailable", "no retrieval service configured", request)
        t0 = time.perf_counter()
        try:
            res = retrieval.retrieve_products(user_id=req.user_id, k=req.candidates, filters=req.filters,
                                              recent_product_ids=req.recent_product_ids or None, request_id=rid)
        except RetrievalClientError as e:
            metrics.retrieval_errors.labels("client" if e.status and 400 <= e.status < 500 else "unavailable").inc()
            if e.status is not None and 400 <= e.status < 500:
                body = e.body if isinstance(e.body, dict) else {}
                err = body.get("error") if isinstance(body.get("error"), dict) else {}
                return error(e.status, err.get("code", "retrieval_rejected"),
                             f"retrieval rejected the request: {err.get('message', e)}", request, err.get("fields"))
            return error(503, "retrieval_unavailable", f"retrieval service unavailable: {e}", request)
        metrics.retrieval.observe(time.perf_counter() - t0)
        bundle_version = res.get("bundle_version")
        request.scope.setdefault("state", {})["bundle_version"] = bundle_version
        cands = res.get("candidates") or []
        rk, ver = ranker_for(res.get("variant"), request)
        items, reason = (run_ranker(rk, "/v1/recommend", req.user_id, cands, req.context.model_dump(), req.expand_offers)
                         if cands else ([], None))
        if items is None:
            out = [{"product_id": c["product_id"], "seller_id": c.get("seller_id"), "score": c.get("score"),
                    "rank": i + 1, "retrieval_rank": c.get("rank", i + 1), "retrieval_score": c.get("score"),
                    "price": c.get("price")} for i, c in enumerate(cands[: req.k])]
        else:
            out = [{"product_id": r.product_id, "seller_id": r.seller_id,
                    "score": r.score if math.isfinite(r.score) else None, "rank": j + 1,
                    "retrieval_rank": cands[r.position].get("rank", r.position + 1),
                    "retrieval_score": cands[r.position].get("score"),
                    "price": r.price if r.price is not None else cands[r.position].get("price")}
                   for j, r in enumerate(items[: req.k])]
        body = {
            "request_id": rid, "user_id": req.user_id, "bundle_version": bundle_version, "ranker_version": ver,
            "fallback": None if items is not None else "retrieval_order", "fallback_reason": reason,
            "retrieval_fallback": bool(res.get("fallback", False)), "items": out,
        }
        if res.get("variant"):
            body["experiment"], body["variant"] = res.get("experiment", ""), res["variant"]
            request.scope["state"].update(experiment=body["experiment"], variant=body["variant"])
        if exposures is not None and req.user_id is not None:
            try:
                exposures.log_exposure(rid, req.user_id, res.get("experiment", ""), res.get("variant") or "default",
                                       out, bundle_version=bundle_version, ranker_version=ver)
            except Exception:  # noqa: BLE001 - the response matters more than its exposure record
                exposure_errors[0] += 1
                log.exception("exposure log: could not record request %s", rid)
        return JSONResponse(body)

    @app.get("/v1/products/{product_id}/best-sellers", tags=["products"],
             summary="Rank the sellers offering a product for a user (price, shipping, stock, seller quality, affinity)")
    def best_sellers(
        product_id: str, request: Request, user_id: str | None = Query(default=None, max_length=256),
        k: int = Query(default=10, ge=1, le=max_k), hour: int | None = Query(default=None, ge=0, le=23),
        dow: int | None = Query(default=None, ge=0, le=6),
    ) -> JSONResponse:
        from ranking.scorer import UnknownProductError

        try:
            sellers = ranker.best_sellers(product_id, user_id, k, {"hour": hour, "dow": dow})
        except UnknownProductError as e:
            return error(404, "unknown_product", str(e), request)
        return JSONResponse({"request_id": _rid(request), "ranker_version": version, "product_id": product_id,
                             "user_id": user_id, "sellers": sellers})

    @app.get("/healthz", tags=["ops"])
    def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "request_id": _rid(request), "ranker_version": version})

    @app.get("/readyz", tags=["ops"])
    def readyz(request: Request) -> JSONResponse:
        state = "not configured"
        if retrieval is not None:
            try:
                retrieval.request("GET", "/readyz", request_id=_rid(request), timeout_s=0.5)
                state = "ok"
            except Exception:  # noqa: BLE001 - readiness reports, it does not fail on the dependency
                state = "unavailable"
        return JSONResponse({"status": "ready", "request_id": _rid(request), "ranker_version": version,
                             "ranker_bundle_version": getattr(ranker, "bundle_version", None), "retrieval": state})

    @app.get("/metrics", tags=["ops"])
    def prom() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(cfg: Config, run_dir: str | Path, retrieval_url: str, host: str | None = None, port: int | None = None,
          bundle: str | Path | None = None) -> None:
    """``recsys serve-ranker --run RUN_DIR --retrieval-url URL``: the ranking API with uvicorn (one process).

    Args:
        run_dir: run directory with ``ranker/`` and ``bundles/CURRENT`` (or pass ``bundle``).
        retrieval_url: base URL of the retrieval service (``recsys serve``).
        host, port: default ``serve.host`` / ``serve.ranking_port``.
    """
    import uvicorn

    from ranking.scorer import Ranker
    from retrieval.client import RetrievalClient

    ranker = Ranker.load(Path(run_dir) / "ranker", bundle or run_dir)
    variant_rankers = {}
    for v in cfg.ab.variants if cfg.ab.experiment else ():
        if v.ranker:
            # a run directory (its ranker/ and bundles/CURRENT) or a ranker directory inside one
            p = Path(v.ranker)
            rdir, rsrc = (p / "ranker", p) if (p / "ranker").is_dir() else (p, v.bundle or p.parent)
            variant_rankers[v.name] = Ranker.load(rdir, rsrc)
    client = RetrievalClient(retrieval_url, timeout_s=cfg.serve.request_timeout_s, retries=cfg.serve.retries,
                             caller="ranking")
    app = create_app(ranker, cfg, client, variant_rankers=variant_rankers)
    uvicorn.run(app, host=host or cfg.serve.host, port=int(port or cfg.serve.ranking_port), log_level="warning",
                access_log=False, timeout_keep_alive=30)
