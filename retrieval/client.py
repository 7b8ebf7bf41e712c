"""HTTP client of the retrieval API (httpx): timeouts, retries with exponential backoff, request ids.

Retries happen on connection errors, timeouts and 5xx answers (the same ``X-Request-ID`` is sent on
every attempt, so server logs tie them together); 4xx answers are not retried and raise
:class:`RetrievalClientError` with the server's message (which names the invalid fields).

    c = RetrievalClient("http://127.0.0.1:8000", timeout_s=2.0, retries=2)
    c.retrieve_products(user_id="u1", k=100, filters={"in_stock": True})
    swap_bundle("http://127.0.0.1:8000", "runs/x/bundles/20250101T000000-abcd1234")
"""

from __future__ import annotations

import time
import uuid
from typing import Any

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
        timeout_s: per-attempt timeout (connect, read, write, pool).
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
        self._own = http_client is None
        self._http = http_client or httpx.Client(timeout=httpx.Timeout(self.timeout_s))
        self.last_request_id: str | None = None

    def close(self) -> None:
        if self._own:
            self._http.close()

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
        url = self.base_url + path
        # an injected client (e.g. a TestClient) keeps its own timeouts unless the call sets one
        kw = {"timeout": httpx.Timeout(timeout_s if timeout_s is not None else self.timeout_s)} if (
            self._own or timeout_s is not None) else {}
        params = {k: v for k, v in (params or {}).items() if v is not None}
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * (2 ** (attempt - 1)))
            try:
                r = self._http.request(method, url, json=json, params=params, headers=h, **kw)
            except httpx.TransportError as e:  # connect / read errors, timeouts
                last = e
                continue
            if r.status_code >= 500:
                last = RetrievalClientError(f"{method} {path}: HTTP {r.status_code}", r.status_code, _body(r), rid)
                continue
            body = _body(r)
            if r.status_code >= 400:
                msg = body.get("error", {}).get("message") if isinstance(body, dict) and isinstance(body.get("error"), dict) else body
                raise RetrievalClientError(f"{method} {path}: HTTP {r.status_code}: {msg}", r.status_code, body, rid)
            return body
        if isinstance(last, RetrievalClientError):
            raise RetrievalClientError(f"{last} (after {self.retries + 1} attempts)", last.status, last.body, rid)
        raise RetrievalClientError(f"{method} {url}: {type(last).__name__}: {last} (after {self.retries + 1} attempts)",
                                   None, None, rid) from last

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
        r = self._http.get(self.base_url + "/metrics", timeout=self.timeout_s)
        r.raise_for_status()
        return r.text

    def swap_bundle(self, path: str, timeout_s: float = 300.0, request_id: str | None = None) -> dict[str, Any]:
        """Ask the server to verify, load and swap to the bundle at ``path`` (a path on the server)."""
        headers = {"X-Admin-Token": self.admin_token} if self.admin_token else None
        return self.request("POST", "/admin/bundle", json={"path": str(path)}, request_id=request_id,
                            headers=headers, timeout_s=timeout_s)


def _seg(s: str) -> str:
    from urllib.parse import quote

    return quote(str(s), safe="")


def _body(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text


def swap_bundle(url: str, path: str, timeout_s: float = 300.0, admin_token: str | None = None) -> dict[str, Any]:
    """``recsys bundle swap --url URL --bundle DIR``: swap the server at ``url`` to bundle ``path``.

    Not retried on 4xx (a refused bundle); the old bundle keeps serving in that case.
    """
    import os

    token = admin_token if admin_token is not None else os.environ.get("RECSYS_ADMIN_TOKEN")
    with RetrievalClient(url, timeout_s=timeout_s, retries=0, admin_token=token) as c:
        return c.swap_bundle(path, timeout_s=timeout_s)
