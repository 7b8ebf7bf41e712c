"""HTTP client of the retrieval API: keep-alive connection pool, timeouts, retries with backoff, request ids.

The default transport is a small pool of ``http.client`` keep-alive connections: on loopback it
costs about 0.5 ms of CPU per call against 1.1 ms for httpx (measured on the 2-core box with a
100-candidate answer), which matters when the ranking service calls retrieval on every request.
An injected ``httpx.Client`` (e.g. FastAPI's ``TestClient`` or a mock transport) is used as given.

Retries happen on connection errors, timeouts and 5xx answers (the same ``X-Request-ID`` is sent on
every attempt, so server logs tie them together); 4xx answers are not retried and raise
:class:`RetrievalClientError` with the server's message (which names the invalid fields).

    c = RetrievalClient("http://127.0.0.1:8000", timeout_s=2.0, retries=2)
    c.retrieve_products(user_id="u1", k=100, filters={"in_stock": True})
    swap_bundle("http://127.0.0.1:8000", "runs/x/bundles/20250101T000000-abcd1234")
"""

from __future__ import annotations

import http.client
import json as jsonlib
import socket
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx


class RetrievalClientError(RuntimeError):
    """The API answered with an error (``status``, parsed ``body``) or could not be reached."""

    def __init__(self, message: str, status: int | None = None, body: Any = None, request_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = body
        self.request_id = request_id


class RetrievalClient:
    """Client of ``retrieval.service``; every method returns the decoded JSON body.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        timeout_s: per-attempt timeout of each socket operation (connect, send, each read).
        retries: extra attempts after the first on connection errors / timeouts / 5xx.
        backoff_s: first backoff; doubled after each failed attempt.
        http_client: an existing ``httpx.Client`` (e.g. FastAPI's ``TestClient``); not closed by ``close``.
        admin_token: sent as ``X-Admin-Token`` on admin calls.
        caller: sent as ``X-Recsys-Caller`` (``"ranking"``: the caller logs A/B exposures itself, so the
            retrieval service does not log the candidate list as shown).
    """

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 2.0,
        retries: int = 2,
        backoff_s: float = 0.05,
        http_client: httpx.Client | None = None,
        admin_token: str | None = None,
        caller: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.retries = max(0, int(retries))
        self.backoff_s = float(backoff_s)
        self.admin_token = admin_token
        self._caller = {"X-Recsys-Caller": caller} if caller else {}
        self._http = http_client
        self._pool = ConnectionPool(self.base_url, self.timeout_s) if http_client is None else None
        self.last_request_id: str | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> RetrievalClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ transport

    def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        request_id: str | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """One API call with retries; returns the JSON body of a 2xx answer."""
        rid = request_id or uuid.uuid4().hex
        self.last_request_id = rid
        h = {"X-Request-ID": rid, **self._caller, **(headers or {})}
        params = {k: v for k, v in (params or {}).items() if v is not None}
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * (2 ** (attempt - 1)))
            try:
                status, raw = self._send(method, path, json, params, h, timeout_s)
            except TransportError as e:  # connect / read errors, timeouts
                last = e
                continue
            body = _decode(raw)
            if status >= 500:
                last = RetrievalClientError(f"{method} {path}: HTTP {status}", status, body, rid)
                continue
            if status >= 400:
                msg = body.get("error", {}).get("message") if isinstance(body, dict) and isinstance(body.get("error"), dict) else body
                raise RetrievalClientError(f"{method} {path}: HTTP {status}: {msg}", status, body, rid)
            return body
        if isinstance(last, RetrievalClientError):
            raise RetrievalClientError(f"{last} (after {self.retries + 1} attempts)", last.status, last.body, rid)
        raise RetrievalClientError(f"{method} {self.base_url + path}: {last} (after {self.retries + 1} attempts)",
                                   None, None, rid) from last

    def _send(self, method: str, path: str, body: Any, params: dict[str, Any], headers: dict[str, str],
              timeout_s: float | None) -> tuple[int, bytes]:
        """One attempt: (status, raw body); raises :class:`TransportError` when no answer came."""
        if self._pool is not None:
            data = jsonlib.dumps(body).encode() if body is not None else None
            if data is not None:
                headers = {**headers, "Content-Type": "application/json"}
            target = path + ("?" + urlencode(params) if params else "")
            return self._pool.request(method, target, data, headers, timeout_s)  # None: the pool's default
        # an injected client (e.g. a TestClient) keeps its own timeouts unless the call sets one
        kw = {"timeout": httpx.Timeout(timeout_s)} if timeout_s is not None else {}
        try:
            r = self._http.request(method, self.base_url + path, json=body, params=params, headers=headers, **kw)
        except httpx.TransportError as e:
            raise TransportError(f"{type(e).__name__}: {e}") from e
        return r.status_code, r.content

    # ------------------------------------------------------------------------------------------ endpoints

    def retrieve_products(
        self,
        user_id: str | None = None,
        k: int = 100,
        filters: dict[str, Any] | None = None,
        recent_product_ids: list[str] | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"k": k}
        if user_id is not None:
            body["user_id"] = user_id
        if recent_product_ids:
            body["recent_product_ids"] = list(recent_product_ids)
        if filters:
            body["filters"] = dict(filters)
        return self.request("POST", "/v1/retrieve/products", json=body, request_id=request_id)

    def retrieve_products_batch(
        self, user_ids: list[str], k: int = 100, filters: dict[str, Any] | None = None, request_id: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"user_ids": list(user_ids), "k": k}
        if filters:
            body["filters"] = dict(filters)
        return self.request("POST", "/v1/retrieve/products:batch", json=body, request_id=request_id)

    def retrieve_sellers(
        self, user_id: str | None = None, k: int = 10, recent_product_ids: list[str] | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"k": k}
        if user_id is not None:
            body["user_id"] = user_id
        if recent_product_ids:
            body["recent_product_ids"] = list(recent_product_ids)
        return self.request("POST", "/v1/retrieve/sellers", json=body, request_id=request_id)

    def product_sellers(
        self, product_id: str, user_id: str | None = None, k: int = 10, request_id: str | None = None
    ) -> dict[str, Any]:
        return self.request("GET", f"/v1/products/{_seg(product_id)}/sellers", params={"user_id": user_id, "k": k},
                            request_id=request_id)

    def similar_products(
        self, product_id: str, k: int = 100, filters: dict[str, Any] | None = None, user_id: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"k": k}
        if filters is not None:
            body["filters"] = dict(filters)
        if user_id is not None:
            body["user_id"] = user_id
        return self.request("POST", f"/v1/products/{_seg(product_id)}/similar", json=body, request_id=request_id)

    def healthz(self) -> dict[str, Any]:
        return self.request("GET", "/healthz")

    def readyz(self) -> dict[str, Any]:
        return self.request("GET", "/readyz")

    def metrics(self) -> str:
        """The Prometheus exposition text of ``/metrics``."""
        status, raw = self._send("GET", "/metrics", None, {}, {}, None)
        if status != 200:
            raise RetrievalClientError(f"GET /metrics: HTTP {status}", status, _decode(raw))
        return raw.decode()

    def swap_bundle(self, path: str, timeout_s: float = 300.0, request_id: str | None = None) -> dict[str, Any]:
        """Ask the server to verify, load and swap to the bundle at ``path`` (a path on the server)."""
        headers = {"X-Admin-Token": self.admin_token} if self.admin_token else None
        return self.request("POST", "/admin/bundle", json={"path": str(path)}, request_id=request_id,
                            headers=headers, timeout_s=timeout_s)


def _seg(s: str) -> str:
    from urllib.parse import quote

    return quote(str(s), safe="")


def _decode(raw: bytes) -> Any:
    try:
        return jsonlib.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


class TransportError(OSError):
    """No HTTP answer: the connection failed, was reset, or a socket operation timed out."""


class ConnectionPool:
    """Thread-safe pool of keep-alive ``http.client`` connections to one origin.

    A connection is taken for one request and given back after its answer was read completely; a
    failed one is closed. A pooled connection the server has closed meanwhile (keep-alive timeout)
    fails before any answer arrives: that request is sent once more on a fresh connection, without
    counting as a client retry.

    Args:
        base_url: ``http://host:port`` or ``https://host:port`` (a path prefix is kept).
        timeout_s: default timeout of each socket operation.
        max_idle: idle connections kept; more concurrent requests open extra ones, closed after use.
    """

    def __init__(self, base_url: str, timeout_s: float, max_idle: int = 32):
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"base_url: expected http(s)://host[:port], got {base_url!r}")
        self._cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        self._host, self._port = u.hostname, u.port
        self._prefix = u.path.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.max_idle = int(max_idle)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def request(self, method: str, target: str, body: bytes | None, headers: dict[str, str],
                timeout_s: float | None = None) -> tuple[int, bytes]:
        """Send one request; returns (status, body). Raises :class:`TransportError` without an answer."""
        t = self.timeout_s if timeout_s is None else float(timeout_s)
        for fresh_retry in (False, True):
            conn, reused = self._take(t)
            try:
                conn.request(method, self._prefix + target, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                if reused and not fresh_retry:
                    continue  # the server closed an idle keep-alive connection: one fresh try
                raise TransportError(f"{type(e).__name__}: {e}") from e
            except (OSError, http.client.HTTPException) as e:  # refused, timeouts, garbled answers
                conn.close()
                kind = "Timeout" if isinstance(e, (TimeoutError, socket.timeout)) else type(e).__name__
                raise TransportError(f"{kind}: {e}") from e
            if resp.will_close:
                conn.close()
            else:
                self._give_back(conn)
            return resp.status, data
        raise AssertionError("unreachable")

    def _take(self, timeout_s: float) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            return self._cls(self._host, self._port, timeout=timeout_s), False
        conn.timeout = timeout_s
        if conn.sock is not None:
            conn.sock.settimeout(timeout_s)
        return conn, True

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()


def swap_bundle(url: str, path: str, timeout_s: float = 300.0, admin_token: str | None = None) -> dict[str, Any]:
    """``recsys bundle swap --url URL --bundle DIR``: swap the server at ``url`` to bundle ``path``.

    Not retried on 4xx (a refused bundle); the old bundle keeps serving in that case.
    """
    import os

    token = admin_token if admin_token is not None else os.environ.get("RECSYS_ADMIN_TOKEN")
    with RetrievalClient(url, timeout_s=timeout_s, retries=0, admin_token=token) as c:
        return c.swap_bundle(path, timeout_s=timeout_s)
