"""Open-loop Poisson load over keep-alive HTTP/1.1 connections, shared by the API benchmarks.

A dispatcher enqueues each request at its scheduled arrival time; ``connections`` asyncio workers,
each with one keep-alive connection, send them. The client is a few lines of raw HTTP on purpose:
httpx costs about 1.1 ms of CPU per request here (more than the retrieval server spends), and the
load generator shares the 2 cores with the servers it measures. Latency is taken from the scheduled
time (queueing included, no coordinated omission) and from the actual send.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np


async def poisson_load(url: str, path: str, bodies: Sequence[bytes], rps: float, duration: float, seed: int,
                       connections: int = 64, inspect: Callable[[bytes], str | None] | None = None,
                       request_id_prefix: str = "bench") -> dict:
    """Send ``POST path`` with ``bodies`` (cycled) at Poisson arrivals.

    Args:
        url: ``http://host:port``.
        bodies: JSON request bodies, already encoded.
        rps, duration: arrival rate (requests/s) and seconds of arrivals.
        inspect: called with each 200 response body; a non-None return is counted under ``tags``
            (e.g. a fallback flag).

    Returns:
        dict with ``requests``, ``wall_s``, ``sched`` and ``send`` (latencies in seconds, arrays),
        ``errors`` (status codes or exception names) and ``tags`` (name -> count).
    """
    host, port = url.split("//", 1)[1].rstrip("/").split(":")
    rng = np.random.default_rng(seed)
    n = int(rps * duration)
    arrivals = np.cumsum(rng.exponential(1.0 / rps, n))
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n".encode()
    lat_sched: list[float] = []
    lat_send: list[float] = []
    errors: list[object] = []
    tags: dict[str, int] = {}
    queue: asyncio.Queue = asyncio.Queue()

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                i, due, body = item
                sent = time.perf_counter()
                try:
                    writer.write(head + b"X-Request-ID: %s-%d\r\nContent-Length: %d\r\n\r\n%s" % (
                        request_id_prefix.encode(), i, len(body), body))
                    await writer.drain()
                    status = int((await reader.readline()).split()[1])
                    length = 0
                    while True:
                        line = await reader.readline()
                        if line in (b"\r\n", b""):
                            break
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    payload = await reader.readexactly(length)
                    if status != 200:
                        errors.append(status)
                    elif inspect is not None:
                        tag = inspect(payload)
                        if tag is not None:
                            tags[tag] = tags.get(tag, 0) + 1
                except Exception as e:  # noqa: BLE001 - count every failure, reconnect
                    errors.append(type(e).__name__)
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
                done = time.perf_counter()
                lat_sched.append(done - due)
                lat_send.append(done - sent)
        finally:
            writer.close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    await asyncio.sleep(0.2)  # connections up
    t0 = time.perf_counter()
    for i, at in enumerate(arrivals):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((i, t0 + at, bodies[i % len(bodies)]))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    wall = time.perf_counter() - t0
    return {"requests": n, "wall_s": wall, "sched": np.array(lat_sched), "send": np.array(lat_send),
            "errors": errors, "tags": tags}


def cpu_seconds(pid: int, children: bool = True) -> float | None:
    """User + system CPU seconds of a process and (with ``children``) its live child processes
    (Linux /proc; uvicorn's worker processes are children of the supervisor), None elsewhere."""
    pids = [pid]
    if children:
        try:
            for t in Path(f"/proc/{pid}/task").iterdir():
                kids = (t / "children").read_text().split()
                pids += [int(k) for k in kids]
        except OSError:
            pass
    total = 0.0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            if p == pid:
                return None
    return total


def pct(a: np.ndarray, digits: int = 2) -> dict:
    """p50 / p90 / p99 / max in ms of latencies in seconds, rounded to ``digits``."""
    if len(a) == 0:
        return {}
    q = np.percentile(a * 1000, [50, 90, 99])
    return {"p50_ms": round(float(q[0]), digits), "p90_ms": round(float(q[1]), digits),
            "p99_ms": round(float(q[2]), digits), "max_ms": round(float(a.max() * 1000), digits)}
