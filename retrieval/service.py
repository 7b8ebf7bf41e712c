"""The retrieval HTTP API (FastAPI): ``create_app(bundle_or_run_dir, cfg)`` and ``serve(...)`` (uvicorn).

Endpoints (OpenAPI at ``/openapi.json``, docs at ``/docs``)::

    POST /v1/retrieve/products            {user_id?, recent_product_ids? (oldest first), k, filters?}
    POST /v1/retrieve/products:batch      {user_ids[<= serve.max_batch_users], k, filters?}
    POST /v1/retrieve/sellers             {user_id?, recent_product_ids?, k}
    GET|POST /v1/products/{product_id}/sellers   (?user_id=&k= | {user_id?, k})
    POST /v1/products/{product_id}/similar       {k, filters?, user_id?}
    GET  /healthz   GET /readyz   GET /metrics (Prometheus)
    POST /admin/bundle  {path, variant?}   verify + load a bundle, then swap it in atomically

A/B: with ``ab.experiment`` and ``ab.variants`` set, each user is assigned a variant by a salted hash
(``recsys.ab.assignment``); a variant with ``bundle`` set is served from that bundle (loaded at start,
swappable with ``{"variant": name}``), the others from the main bundle. User responses then carry
``experiment`` and ``variant`` (also ``X-Experiment`` / ``X-Variant`` headers) and the bundle of the
variant. With ``serve.exposure_log`` set, every product list returned for a user is appended to the
exposure log (``recsys.ab.exposure_log``, sub-directory ``retrieval/``) unless the request comes from the ranking service
(header ``X-Recsys-Caller: ranking``), which logs what it finally shows instead.

Every JSON response carries ``request_id`` (the incoming ``X-Request-ID`` when it is a sane token,
else a new one; also echoed as a header) and ``bundle_version`` (also the ``X-Bundle-Version`` header).
Invalid input (wrong types, ``k`` outside 1..serve.max_k, unknown filter names, oversized batches) is a
422 whose ``error.fields`` name the offending fields; an unknown product is a 404; a refused bundle
swap is a 409 and the old bundle keeps serving. Unexpected failures become a JSON 500 with the request
id, never an HTML page or a dropped connection.

The live bundle is one immutable snapshot (retriever + version) behind a single reference: a request
reads it once, a swap replaces it after the new bundle is fully loaded, verified and warmed up, so no
request fails or mixes bundles during a swap. Single-query handlers run inline on the event loop
(about a millisecond of work each: cheaper than a thread-pool hop); the batch endpoint and the bundle
swap are sync functions run in the thread pool, so they never stall other requests.
"""


import contextlib
import gc
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from recsys.ab.exposure_log import Route, VariantRouter
from recsys.config import Config, ConfigError
from retrieval.bundle import Bundle, BundleError, ensure_bundle, load_bundle, resolve_bundle_path
from retrieval.common import RetrievalError, request_id_from_scope
from retrieval.json_response import JSONResponse
from retrieval.retriever import Filters, Retriever, UnknownItemError

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "RECSYS_ADMIN_TOKEN"
CALLER_HEADER = "x-recsys-caller"  # "ranking": the caller logs the exposure of what it shows


@dataclass(frozen=True)
class Live:
    """The bundle being served: swapped as one reference."""

    retriever: Retriever
    version: str
    path: str
    loaded_at: float


class ServiceState:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.live: Live | None = None
        self.variants: dict[str, Live] = {}  # A/B variants with their own bundle
        self.router: VariantRouter[str] | None = None
        self.swap_lock = threading.Lock()

    def for_user(self, user_id: str | None) -> tuple[Live, Route[str] | None]:
        """The bundle that serves this user and the user's A/B route (None without a router or user)."""
        if self.router is None or user_id is None:
            return self.live, None
        route = self.router.route(user_id)
        return self.variants.get(route.variant, self.live), route


def make_router(cfg: Config) -> VariantRouter[str] | None:
    """The A/B router (variant names as handlers) with the exposure log, or None when neither is configured."""
    active = bool(cfg.ab.experiment) and bool(cfg.ab.variants)
    if not active and not cfg.serve.exposure_log:
        return None
    names = [v.name for v in cfg.ab.variants] if active else ["default"]
    # each service writes its own sub-directory (one writer per directory); readers read them all
    log_dir = str(Path(cfg.serve.exposure_log) / "retrieval") if cfg.serve.exposure_log else ""
    return VariantRouter.from_config(cfg.ab, {n: n for n in names}, log_dir=log_dir,
                                     rotate_mb=cfg.serve.exposure_rotate_mb)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("recsys_requests_total", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram(
            "recsys_request_seconds", "Request latency", ["route"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.fallback = Counter("recsys_fallback_total", "Lists served from popularity (unknown users)", registry=r)
        self.bundle = Gauge("recsys_bundle_info", "Live bundle (value 1)", ["version"], registry=r)
        self.swaps = Counter("recsys_bundle_swaps_total", "Bundle swap attempts", ["result"], registry=r)


def _error(status: int, code: str, message: str, request: Request, live: Live | None = None,
           fields: list[dict[str, str]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if fields is not None:
        body["error"]["fields"] = fields
    body["request_id"] = _rid(request)
    body["bundle_version"] = live.version if live else _version(request)
    return JSONResponse(body, status_code=status)


def _rid(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex


def _version(request: Request) -> str | None:
    st: ServiceState = request.app.state.service
    return st.live.version if st.live else None


class RequestContext:
    """Pure ASGI middleware: request id, version headers, latency metrics, JSON 500 on crashes."""

    def __init__(self, app, state: ServiceState, metrics: Metrics):
        self.app = app
        self.state = state
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from_scope(scope)
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        status = [500]
        started = [False]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                started[0] = True
                status[0] = message["status"]
                h = MutableHeaders(scope=message)
                h["x-request-id"] = rid
                st = scope["state"]
                live = self.state.live
                version = st.get("bundle_version") or (live.version if live is not None else None)
                if version is not None:
                    h["x-bundle-version"] = version
                if st.get("variant"):
                    h["x-experiment"] = st.get("experiment", "")
                    h["x-variant"] = st["variant"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:  # noqa: BLE001 - never drop a connection or leak a traceback
            log.exception("unhandled error (request %s)", rid)
            if not started[0]:
                live = self.state.live
                resp = JSONResponse(
                    {"error": {"code": "internal", "message": "internal error; see the server log"},
                     "request_id": rid, "bundle_version": live.version if live else None},
                    status_code=500,
                )
                await resp(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(name, scope.get("method", ""), str(status[0])).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - t0)


def _limit_blas(threads: int) -> None:
    """Cap NumPy's BLAS threads: a multi-threaded BLAS on tiny per-request products only adds latency."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it BLAS keeps its default threads
        return
    threadpool_limits(threads, user_api="blas")


def _load_live(path: str | Path, cfg: Config) -> Live:
    bundle = load_bundle(path)
    return _live_from_bundle(bundle, cfg)


def _live_from_bundle(bundle: Bundle, cfg: Config) -> Live:
    r = Retriever(bundle, cfg)
    # warm up: first calls allocate and fill caches
    probe = [str(bundle.user_ids[0])] if len(bundle.user_ids) else ["warmup"]
    r.recommend_products(probe, min(10, max(1, r.P)))
    # the bundle's millions of long-lived objects need not be scanned by every GC pass
    gc.collect()
    gc.freeze()
    return Live(r, bundle.version, str(bundle.path or ""), time.time())


def create_app(
    source: str | Path | Bundle,
    cfg: Config,
    admin_token: str | None = None,
    threads: int | None = 1,
) -> FastAPI:
    """The retrieval API serving one bundle.

    Args:
        source: a bundle directory, a bundles directory or a run directory (its ``bundles/CURRENT``;
            built first when the run has a model but no bundle), or a loaded :class:`Bundle`.
        cfg: resolved configuration (``serve`` limits, ``retrieval`` settings, ``data.bought_events``).
        admin_token: when set (default: ``$RECSYS_ADMIN_TOKEN``), ``POST /admin/bundle`` requires the
            header ``X-Admin-Token`` with this value.
        threads: FAISS / torch threads per request (1 suits many concurrent single queries); None keeps them.

    Raises:
        BundleError: the bundle cannot be loaded or verified.
    """
    if threads is not None:
        import faiss
        import torch

        faiss.omp_set_num_threads(int(threads))
        torch.set_num_threads(int(threads))
        _limit_blas(int(threads))
    admin_token = admin_token if admin_token is not None else os.environ.get(ADMIN_TOKEN_ENV) or None
    state = ServiceState(cfg)
    metrics = Metrics()
    if isinstance(source, Bundle):
        state.live = _live_from_bundle(source, cfg)
    else:
        p = Path(source)
        try:
            path = resolve_bundle_path(p)
        except BundleError:
            if not (p / "model").is_dir():
                raise
            path = ensure_bundle(cfg, p)
        state.live = _load_live(path, cfg)
    metrics.bundle.labels(state.live.version).set(1)
    for v in cfg.ab.variants if cfg.ab.experiment else ():
        if v.bundle:
            try:
                state.variants[v.name] = _load_live(resolve_bundle_path(Path(v.bundle)), cfg)
            except BundleError as e:
                raise ConfigError(f"ab.variants[{v.name}].bundle: {e}") from e
    state.router = make_router(cfg)

    sv = cfg.serve
    max_k = int(sv.max_k)
    default_k = min(100, max_k)

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class FiltersIn(Strict):
        exclude_bought: bool = True
        in_stock: bool = False
        categories: list[str] = Field(default_factory=list, max_length=256)
        min_price: float | None = Field(default=None, ge=0)
        max_price: float | None = Field(default=None, ge=0)
        min_seller_rating: float | None = None
        max_per_seller: int = Field(default=0, ge=0, le=max_k)

        @model_validator(mode="after")
        def _range(self):
            if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
                raise ValueError("min_price must be <= max_price")
            return self

        def to_filters(self) -> Filters:
            return Filters(self.exclude_bought, self.in_stock, tuple(self.categories), self.min_price,
                           self.max_price, self.min_seller_rating, self.max_per_seller)

    class ProductsIn(Strict):
        user_id: str | None = Field(default=None, max_length=256)
        recent_product_ids: list[str] = Field(default_factory=list, max_length=int(sv.max_history))
        k: int = Field(default=default_k, ge=1, le=max_k)
        filters: FiltersIn = Field(default_factory=FiltersIn)

    class BatchIn(Strict):
        user_ids: list[str] = Field(min_length=1, max_length=int(sv.max_batch_users))
        k: int = Field(default=default_k, ge=1, le=max_k)
        filters: FiltersIn = Field(default_factory=FiltersIn)

    class SellersIn(Strict):
        user_id: str | None = Field(default=None, max_length=256)
        recent_product_ids: list[str] = Field(default_factory=list, max_length=int(sv.max_history))
        k: int = Field(default=10, ge=1, le=max_k)

    class ProductSellersIn(Strict):
        user_id: str | None = Field(default=None, max_length=256)
        k: int = Field(default=10, ge=1, le=max_k)

    class SimilarIn(Strict):
        k: int = Field(default=default_k, ge=1, le=max_k)
        filters: FiltersIn = Field(default_factory=lambda: FiltersIn(exclude_bought=False))
        user_id: str | None = Field(default=None, max_length=256)

    class SwapIn(Strict):
        path: str = Field(min_length=1, max_length=4096)
        variant: str | None = Field(default=None, max_length=256)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        if state.router is not None:
            state.router.close()  # flush and fsync the exposure log

    app = FastAPI(
        lifespan=lifespan,
        default_response_class=JSONResponse,
        title="recsys retrieval",
        version="1",
        description="Two-tower candidate retrieval for products and sellers (FAISS), with marketplace filters.",
    )
    app.state.service = state
    app.state.metrics = metrics
    app.add_middleware(RequestContext, state=state, metrics=metrics)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        resp = _error(exc.status_code, code, str(exc.detail), request)
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()))
            fields.append({"field": loc, "message": str(e.get("msg", "invalid"))})
        msg = "; ".join(f"{f['field']}: {f['message']}" for f in fields) or "invalid request"
        return _error(422, "invalid_request", f"invalid request: {msg}", request, fields=fields)

    def _cands(cs) -> list[dict[str, Any]]:
        return [{"product_id": c.product_id, "score": c.score, "rank": c.rank, "seller_id": c.seller_id,
                 "price": c.price} for c in cs]

    def _rows(r: Retriever, t, row: int) -> list[dict[str, Any]]:
        """Candidate dicts straight from the arrays (the hot path: no intermediate objects).

        Scores are rounded to 6 decimals and prices to 4 (shorter JSON, cheaper to encode)."""
        n = int(t.counts[row])
        pids = r.product_ids_at(t.positions[row, :n]).tolist()
        sids = r.seller_ids_of_idx(t.seller_idx[row, :n]).tolist()
        return [
            {"product_id": p, "score": sc, "rank": j, "seller_id": sid, "price": None if pr != pr else pr}
            for j, (p, sc, sid, pr) in enumerate(
                zip(pids, np.round(t.scores[row, :n].astype(np.float64), 6).tolist(), sids,
                    np.round(t.price[row, :n].astype(np.float64), 4).tolist(), strict=True), 1)
        ]

    def _ok(request: Request, live: Live, body: dict[str, Any], route: Route[str] | None = None) -> JSONResponse:
        body["request_id"] = _rid(request)
        body["bundle_version"] = live.version
        st = request.scope.setdefault("state", {})
        st["bundle_version"] = live.version
        if route is not None and route.experiment:
            body["experiment"], body["variant"] = route.experiment, route.variant
            st["experiment"], st["variant"] = route.experiment, route.variant
        return JSONResponse(body)

    def _log_exposure(request: Request, live: Live, route: Route[str] | None, user_id: str,
                      items: list[dict[str, Any]], part: int | None = None) -> None:
        if route is None or state.router is None or request.headers.get(CALLER_HEADER) == "ranking":
            return
        # one record per user list; a batch's lists get "<request id>/<position in the batch>" so
        # readers that de-duplicate by request id keep them all
        rid = _rid(request) if part is None else f"{_rid(request)}/{part}"
        state.router.record(route, user_id, items, request_id=rid, bundle_version=live.version)

    def _per_user(user_ids: list[str]) -> list[tuple[Live, Route[str] | None]]:
        return [state.for_user(u) for u in user_ids]

    @app.post("/v1/retrieve/products", tags=["retrieve"], summary="Top-k products for one user or session")
    async def retrieve_products(req: ProductsIn, request: Request) -> JSONResponse:
        live, route = state.for_user(req.user_id)
        recent = [req.recent_product_ids] if req.recent_product_ids else None
        t = live.retriever.topk_products([req.user_id], req.k, req.filters.to_filters(), recent)
        fb = bool(t.fallback[0])
        if fb:
            metrics.fallback.inc()
        rows = _rows(live.retriever, t, 0)
        _log_exposure(request, live, route, req.user_id, rows)
        return _ok(request, live, {"user_id": req.user_id, "fallback": fb, "candidates": rows}, route)

    @app.post("/v1/retrieve/products:batch", tags=["retrieve"], summary="Top-k products for a batch of users")
    def retrieve_products_batch(req: BatchIn, request: Request) -> JSONResponse:
        users = list(req.user_ids)
        routed = _per_user(users)
        results: list[dict[str, Any] | None] = [None] * len(users)
        # one search per bundle: users of the same variant are answered together
        for live in {id(lv): lv for lv, _ in routed}.values():
            idx = [i for i, (lv, _) in enumerate(routed) if lv is live]
            t = live.retriever.topk_products([users[i] for i in idx], req.k, req.filters.to_filters())
            n_fb = int(t.fallback.sum())
            if n_fb:
                metrics.fallback.inc(n_fb)
            for row, i in enumerate(idx):
                rows = _rows(live.retriever, t, row)
                route = routed[i][1]
                _log_exposure(request, live, route, users[i], rows, part=i)
                res = {"user_id": users[i], "fallback": bool(t.fallback[row]), "candidates": rows,
                       "bundle_version": live.version}
                if route is not None and route.experiment:
                    res["experiment"], res["variant"] = route.experiment, route.variant
                results[i] = res
        return _ok(request, state.live, {"results": results})

    @app.post("/v1/retrieve/sellers", tags=["retrieve"], summary="Top-k sellers for one user or session")
    async def retrieve_sellers(req: SellersIn, request: Request) -> JSONResponse:
        live, route = state.for_user(req.user_id)
        recent = [req.recent_product_ids] if req.recent_product_ids else None
        res = live.retriever.recommend_sellers([req.user_id], req.k, recent)[0]
        if res.fallback:
            metrics.fallback.inc()
        return _ok(request, live, {
            "user_id": req.user_id, "fallback": res.fallback,
            "sellers": [{"seller_id": s.seller_id, "score": s.score, "rank": s.rank} for s in res.sellers],
        }, route)

    def _product_sellers(product_id: str, user_id: str | None, k: int, request: Request) -> JSONResponse:
        live = state.live
        try:
            offers = live.retriever.sellers_for_product(product_id, user_id, k)
        except UnknownItemError as e:
            return _error(404, "unknown_product", str(e), request, live)
        return _ok(request, live, {"product_id": product_id, "user_id": user_id, "sellers": [
            {"seller_id": o.seller_id, "score": None if o.score != o.score else o.score, "rank": o.rank,
             "price": o.price, "stock": o.stock, "shipping_days": o.shipping_days, "rating": o.rating,
             "buy_box": o.buy_box} for o in offers
        ]})

    @app.get("/v1/products/{product_id}/sellers", tags=["products"], summary="Best sellers for a product")
    async def product_sellers_get(
        product_id: str, request: Request, user_id: str | None = Query(default=None, max_length=256),
        k: int = Query(default=10, ge=1, le=max_k),
    ) -> JSONResponse:
        return _product_sellers(product_id, user_id, k, request)

    @app.post("/v1/products/{product_id}/sellers", tags=["products"], summary="Best sellers for a product")
    async def product_sellers_post(product_id: str, req: ProductSellersIn, request: Request) -> JSONResponse:
        return _product_sellers(product_id, req.user_id, req.k, request)

    @app.post("/v1/products/{product_id}/similar", tags=["products"], summary="Products similar to a product")
    async def similar(product_id: str, req: SimilarIn, request: Request) -> JSONResponse:
        live = state.live
        try:
            cands = live.retriever.similar_products(product_id, req.k, req.filters.to_filters(), req.user_id)
        except UnknownItemError as e:
            return _error(404, "unknown_product", str(e), request, live)
        return _ok(request, live, {"product_id": product_id, "candidates": _cands(cands)})

    @app.get("/healthz", tags=["ops"])
    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "request_id": _rid(request), "bundle_version": _version(request)})

    @app.get("/readyz", tags=["ops"])
    async def readyz(request: Request) -> JSONResponse:
        live = state.live
        if live is None:
            return JSONResponse({"status": "not ready", "request_id": _rid(request), "bundle_version": None}, 503)
        return JSONResponse({"status": "ready", "request_id": _rid(request), "bundle_version": live.version,
                             "bundle_path": live.path, "products": live.retriever.P, "sellers": live.retriever.S})

    @app.get("/metrics", tags=["ops"])
    async def prom() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/bundle", tags=["ops"], summary="Verify, load and atomically swap to another bundle")
    def swap_bundle(req: SwapIn, request: Request) -> JSONResponse:
        if admin_token and request.headers.get("x-admin-token") != admin_token:
            return _error(403, "forbidden", "missing or wrong X-Admin-Token", request)
        if not state.swap_lock.acquire(blocking=False):
            return _error(409, "swap_in_progress", "another bundle swap is in progress; retry later", request)
        try:
            name = req.variant
            if name is not None and name not in {v.name for v in cfg.ab.variants}:
                return _error(422, "invalid_request", f"variant: unknown A/B variant {name!r}", request,
                              fields=[{"field": "body.variant", "message": f"unknown variant {name!r}"}])
            old = state.variants.get(name, state.live) if name else state.live
            try:
                new = _load_live(req.path, cfg)
            except (BundleError, RetrievalError, OSError, ValueError) as e:
                metrics.swaps.labels("refused").inc()
                return _error(409, "bundle_refused", f"bundle refused, still serving {old.version if old else None}: {e}",
                              request, old)
            if name:
                state.variants[name] = new
            else:
                state.live = new
            metrics.swaps.labels("ok").inc()
            if old is not None and old.version != new.version and name is None:
                metrics.bundle.remove(old.version)
            metrics.bundle.labels(new.version).set(1)
        finally:
            state.swap_lock.release()
        body = {"status": "swapped", "previous_version": old.version if old else None, "bundle_path": new.path}
        if name:
            body["variant"] = name
        return _ok(request, new, body)

    return app


def serve(
    cfg: Config,
    run_dir: str | Path | None = None,
    bundle: str | Path | None = None,
    host: str | None = None,
    port: int | None = None,
) -> None:
    """``recsys serve --run RUN_DIR | --bundle DIR``: run the API with uvicorn (one process)."""
    import uvicorn

    source = bundle or run_dir
    if source is None:
        raise ValueError("recsys serve needs --run RUN_DIR or --bundle DIR")
    app = create_app(source, cfg)
    uvicorn.run(app, host=host or cfg.serve.host, port=int(port or cfg.serve.port), log_level="warning",
                access_log=False, timeout_keep_alive=30)
