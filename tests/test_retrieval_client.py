"""The retrieval client's own transport (keep-alive ``http.client`` pool) against real sockets."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from retrieval.client import ConnectionPool, RetrievalClient, RetrievalClientError


class OneShotServer:
    """Answers each request with JSON and keep-alive, then closes that connection once idle:
    the way a server's keep-alive timeout leaves a pooled connection stale."""

    def __init__(self, status: int = 200, delay_s: float = 0.0, close_after_answer: bool = True):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.status, self.delay_s, self.close_after_answer = status, delay_s, close_after_answer
        self.accepted = 0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line:
                    return
                headers = {}
                while (h := f.readline()) not in (b"\r\n", b""):
                    k, v = h.decode().split(":", 1)
                    headers[k.strip().lower()] = v.strip()
                body = f.read(int(headers.get("content-length", 0)))
                self.requests.append((line.decode().strip(), headers, body))
                time.sleep(self.delay_s)
                out = json.dumps({"n": len(self.requests), "echo": json.loads(body) if body else None}).encode()
                conn.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (self.status, len(out), out))
                if self.close_after_answer:
                    time.sleep(0.05)
                    return
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_pooled_client_sends_json_and_request_id_and_reuses_connections() -> None:
    srv = OneShotServer(close_after_answer=False)
    try:
        with RetrievalClient(f"http://127.0.0.1:{srv.port}", timeout_s=2, retries=0, caller="ranking") as c:
            for i in range(5):
                out = c.retrieve_products(user_id=f"u{i}", k=3, filters={"in_stock": True}, request_id=f"r{i}")
                assert out["echo"] == {"k": 3, "user_id": f"u{i}", "filters": {"in_stock": True}}
            c.product_sellers("p/1 x", user_id="u1", k=2)
        assert srv.accepted == 1  # one keep-alive connection for every call
        line, headers, _ = srv.requests[0]
        assert line.startswith("POST /v1/retrieve/products ") and headers["x-request-id"] == "r0"
        assert headers["x-recsys-caller"] == "ranking" and headers["content-type"] == "application/json"
        assert srv.requests[-1][0].startswith("GET /v1/products/p%2F1%20x/sellers?user_id=u1&k=2 ")
    finally:
        srv.close()


def test_stale_keepalive_connection_is_replaced_without_a_retry() -> None:
    srv = OneShotServer(close_after_answer=True)
    try:
        c = RetrievalClient(f"http://127.0.0.1:{srv.port}", timeout_s=2, retries=0)
        assert c.retrieve_products(user_id="u1")["n"] == 1
        time.sleep(0.2)  # the server has closed the pooled connection by now
        assert c.retrieve_products(user_id="u1")["n"] == 2
        assert srv.accepted == 2
        c.close()
    finally:
        srv.close()


def test_pooled_client_errors_name_the_cause() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens here once closed
    c = RetrievalClient(f"http://127.0.0.1:{dead}", timeout_s=0.5, retries=1, backoff_s=0.001)
    with pytest.raises(RetrievalClientError, match="ConnectionRefusedError.*after 2 attempts"):
        c.healthz()
    slow = OneShotServer(delay_s=1.0, close_after_answer=False)
    try:
        c = RetrievalClient(f"http://127.0.0.1:{slow.port}", timeout_s=0.2, retries=0)
        t0 = time.perf_counter()
        with pytest.raises(RetrievalClientError, match="Timeout"):
            c.retrieve_products(user_id="u1")
        assert time.perf_counter() - t0 < 0.9
    finally:
        slow.close()
    bad = OneShotServer(status=503, close_after_answer=False)
    try:
        c = RetrievalClient(f"http://127.0.0.1:{bad.port}", timeout_s=1, retries=2, backoff_s=0.001)
        with pytest.raises(RetrievalClientError, match="HTTP 503.*after 3 attempts") as e:
            c.retrieve_products(user_id="u1", request_id="same")
        assert e.value.status == 503 and len(bad.requests) == 3
        assert {h["x-request-id"] for _, h, _ in bad.requests} == {"same"}
    finally:
        bad.close()


def test_pool_is_thread_safe_and_bounded() -> None:
    srv = OneShotServer(delay_s=0.02, close_after_answer=False)
    try:
        pool = ConnectionPool(f"http://127.0.0.1:{srv.port}", timeout_s=2, max_idle=2)
        results: list[int] = []

        def call() -> None:
            for _ in range(5):
                status, _ = pool.request("POST", "/x", b"{}", {"Content-Type": "application/json"})
                results.append(status)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == [200] * 30 and len(pool._idle) <= 2
        pool.close()
        assert pool._idle == []
    finally:
        srv.close()
    with pytest.raises(ValueError, match="base_url"):
        ConnectionPool("127.0.0.1:80", 1.0)
