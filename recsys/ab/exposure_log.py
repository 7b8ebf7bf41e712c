"""The exposure log: what each user was shown, by which variant, append-only and crash safe.

Format: JSON Lines, one line per response (``SCHEMA_VERSION`` 1)::

    {"v": 1, "request_id": "r-1", "user_id": "u000123", "experiment": "exp1", "variant": "control",
     "timestamp": 1717171717.123,            # epoch seconds (UTC) of the response
     "items": [{"product_id": "p00042", "seller_id": "s0007", "position": 1}, ...],
     "bundle_version": "20240601-abc" | {"products": "...", "sellers": "..."} | null,
     "ranker_version": "r3" | null}

Files: ``DIR/exposures-00000.jsonl``, ``exposures-00001.jsonl``, ... A writer
(:class:`ExposureLogWriter`) guarantees:

* Durability per batch: lines are buffered and written, flushed and ``fsync``'ed every
  ``batch_lines`` lines, every ``flush_interval_s`` seconds (background thread) and on ``close``.
  A crash loses at most the unflushed batch, never earlier lines.
* Rotation by size: a file is closed once the next line would take it past ``rotate_mb``
  (``serve.exposure_rotate_mb``); the next line goes to the next number. A line is never split.
* Never appending to a file it did not create: every writer session starts a new file number.
  On start the tail of every existing file is checked; a truncated or corrupt tail (a crash in the
  middle of a write) is moved aside to ``exposures-NNNNN.jsonl.partial-<time>`` and the file is
  truncated to its last complete, valid line. Those partial files are not read by the readers.
* One writer per directory: the writer holds an exclusive ``flock`` on ``DIR/.writer.lock``; a
  second writer on the same directory fails at once (with several server processes, give each
  its own sub-directory, e.g. ``DIR/worker-<pid>``; the readers read folders recursively).
* Thread-safe: ``log`` may be called from any thread; the lines of one thread keep their order.
* At-least-once on write errors: lines whose write failed stay buffered and are written again by the
  next flush (a line may then appear twice; readers and the analysis de-duplicate by ``request_id``).

Readers: :func:`read_exposures` (one row per shown item, a pandas DataFrame) and
:func:`iter_records` (the raw records). :class:`VariantRouter` ties assignment, the per-variant
handlers and the log together for the serving layer (framework-free; see its docstring).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import pandas as pd

from recsys.ab.assignment import Assigner
from recsys.config import ABConfig, ConfigError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PREFIX = "exposures-"
SUFFIX = ".jsonl"
LOCK_NAME = ".writer.lock"
_FILE_RE = re.compile(r"^exposures-(\d+)\.jsonl$")
COLUMNS = (
    "request_id",
    "user_id",
    "experiment",
    "variant",
    "timestamp",
    "position",
    "product_id",
    "seller_id",
    "bundle_version",
    "ranker_version",
)


class ExposureLogError(RuntimeError):
    """The exposure log directory cannot be written (locked by another writer, closed writer...)."""


def _file_number(p: Path) -> int | None:
    m = _FILE_RE.match(p.name)
    return int(m.group(1)) if m else None


def _item(x: Any, position: int) -> dict[str, Any]:
    """A shown item as ``{"product_id", "seller_id", "position"}`` from a dict or an object with those attributes."""
    if isinstance(x, dict) or isinstance(x, Mapping):
        pid, sid = x.get("product_id"), x.get("seller_id")
        pos = x.get("position") or position
    elif isinstance(x, str):
        pid, sid, pos = x, None, position
    else:
        pid, sid, pos = getattr(x, "product_id", None), getattr(x, "seller_id", None), position
    if pid is None:
        raise ValueError(f"shown item at position {position} has no product_id: {x!r}")
    return {"product_id": str(pid), "seller_id": None if sid is None else str(sid), "position": int(pos)}


def exposure_record(
    request_id: str | None,
    user_id: str,
    experiment: str,
    variant: str,
    items: Sequence[Any],
    bundle_version: str | Mapping[str, str] | None = None,
    ranker_version: str | None = None,
    timestamp: float | None = None,
) -> dict[str, Any]:
    """One log record. ``items`` in display order (position = 1-based index unless an item carries
    ``position``): dicts or objects with ``product_id`` and optional ``seller_id`` (e.g.
    ``retrieval.retriever.Candidate``), or plain product id strings."""
    return {
        "v": SCHEMA_VERSION,
        "request_id": request_id or uuid.uuid4().hex,
        "user_id": str(user_id),
        "experiment": experiment,
        "variant": variant,
        "timestamp": round(float(time.time() if timestamp is None else timestamp), 6),
        "items": [_item(x, i + 1) for i, x in enumerate(items)],
        "bundle_version": dict(bundle_version) if isinstance(bundle_version, Mapping) else bundle_version,
        "ranker_version": ranker_version,
    }


def _valid_line(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def repair_tail(path: str | Path, max_scan_bytes: int = 64 << 20) -> Path | None:
    """Cut a truncated or corrupt tail off an exposure file and move it aside.

    The file is truncated after its last complete line that parses as a JSON object (looking back at
    most ``max_scan_bytes``, reading 64 KiB first); the removed bytes go to ``<file>.partial-<epoch ms>``.

    Returns:
        The path of the moved-aside bytes, or None when the file was intact.
    """
    path = Path(path)
    size = path.stat().st_size
    window = 64 << 10
    while True:
        start = max(0, size - min(window, max_scan_bytes))
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
        # drop the unterminated tail, then blank or invalid complete lines, from the end
        cut = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
        while cut > 0:
            prev = data.rfind(b"\n", 0, cut - 1)
            if prev < 0 and start > 0:
                cut = 0  # the line may begin before the window
                break
            line = data[prev + 1 : cut - 1]
            if line.strip() and _valid_line(line):
                break
            cut = prev + 1
        if cut > 0 or start == 0:
            break
        if window >= max_scan_bytes:
            raise ExposureLogError(f"{path}: no valid line in its last {max_scan_bytes} bytes; inspect the file by hand")
        window *= 4
    if start + cut == size:
        return None
    aside = path.with_name(f"{path.name}.partial-{int(time.time() * 1000)}")
    with open(aside, "wb") as g:
        g.write(data[cut:])
        g.flush()
        os.fsync(g.fileno())
    with open(path, "r+b") as f:
        f.truncate(start + cut)
        f.flush()
        os.fsync(f.fileno())
    log.warning("exposure log %s: moved a truncated tail of %d bytes aside to %s", path, size - start - cut, aside)
    return aside


class ExposureLogWriter:
    """Append-only, rotated, fsync'ed JSON-lines writer (see the module docstring).

    Example::

        w = ExposureLogWriter(cfg.serve.exposure_log, rotate_mb=cfg.serve.exposure_rotate_mb)
        w.log_exposure("req-1", "u1", "exp1", "control", candidates, bundle_version="v3")
        w.close()                      # or use it as a context manager

    Args:
        directory: the log directory (created).
        rotate_mb: start a new file before one would exceed this size (MiB).
        batch_lines: write + fsync every this many buffered lines.
        flush_interval_s: also flush buffered lines this often from a background thread
            (0 = no thread: lines are written only per batch and on ``flush``/``close``).
        fsync: ``os.fsync`` after each write (turn off only for tests of throughput).
    """

    def __init__(
        self,
        directory: str | Path,
        rotate_mb: float = 64.0,
        batch_lines: int = 256,
        flush_interval_s: float = 1.0,
        fsync: bool = True,
    ):
        if rotate_mb <= 0:
            raise ConfigError(f"serve.exposure_rotate_mb: must be > 0, got {rotate_mb}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rotate_bytes = int(rotate_mb * (1 << 20))
        self.batch_lines = max(1, int(batch_lines))
        self.fsync = fsync
        self._buf: list[bytes] = []
        self._buf_lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._file: Any = None
        self._path: Path | None = None
        self._size = 0
        self._closed = False
        self.lines_written = 0
        self.files: list[Path] = []
        self._lockf = open(self.directory / LOCK_NAME, "a+b")  # noqa: SIM115 - held until close
        try:
            import fcntl

            fcntl.flock(self._lockf.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - non-POSIX: no inter-process lock
            pass
        except OSError as e:
            self._lockf.close()
            raise ExposureLogError(
                f"{self.directory}: another exposure log writer holds {LOCK_NAME}; give each process its own directory"
            ) from e
        existing = sorted((p for p in self.directory.iterdir() if _file_number(p) is not None), key=_file_number)
        self.recovered = [a for p in existing if (a := repair_tail(p)) is not None]
        self._next = (_file_number(existing[-1]) + 1) if existing else 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if flush_interval_s > 0:
            self._interval = float(flush_interval_s)
            self._thread = threading.Thread(target=self._run, name="exposure-log-flusher", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ writing
    def log(self, record: Mapping[str, Any]) -> None:
        """Append one record (a JSON-able mapping, normally from :func:`exposure_record`)."""
        line = (json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str) + "\n").encode()
        with self._buf_lock:
            if self._closed:
                raise ExposureLogError(f"{self.directory}: the exposure log writer is closed")
            self._buf.append(line)
            n = len(self._buf)
        if n >= self.batch_lines:
            if self._thread is not None and n < 16 * self.batch_lines:
                self._wake.set()
            else:  # no flusher thread, or it is far behind: write in the caller (back-pressure)
                self.flush()

    def log_exposure(self, request_id: str | None, user_id: str, experiment: str, variant: str,
                     items: Sequence[Any], bundle_version: str | Mapping[str, str] | None = None,
                     ranker_version: str | None = None, timestamp: float | None = None) -> dict[str, Any]:
        """Build (:func:`exposure_record`) and append one record; returns it."""
        rec = exposure_record(request_id, user_id, experiment, variant, items, bundle_version, ranker_version, timestamp)
        self.log(rec)
        return rec

    def flush(self) -> None:
        """Write, flush and fsync every buffered line."""
        with self._io_lock:
            with self._buf_lock:
                lines, self._buf = self._buf, []
            if lines:
                try:
                    self._write(lines)
                except BaseException:
                    # keep the lines for the next attempt (a partly written line becomes one bad line
                    # that readers skip; the record itself is written again in full)
                    with self._buf_lock:
                        self._buf[:0] = lines
                    if self._file is not None and self._size > 0:
                        self._file.write(b"\n")  # end any partial line so the retry starts clean
                    raise

    def _open_next(self) -> None:
        while True:
            p = self.directory / f"{PREFIX}{self._next:05d}{SUFFIX}"
            self._next += 1
            try:
                self._file = open(p, "xb")  # noqa: SIM115 - closed on rotation / close
            except FileExistsError:
                continue
            self._path, self._size = p, 0
            self.files.append(p)
            return

    def _sync(self) -> None:
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def _write(self, lines: list[bytes]) -> None:
        chunk: list[bytes] = []
        chunk_size = 0
        for line in lines:
            if self._file is None:
                self._open_next()
            if self._size + chunk_size > 0 and self._size + chunk_size + len(line) > self.rotate_bytes:
                if chunk:
                    self._file.write(b"".join(chunk))
                    self._size += chunk_size
                    chunk, chunk_size = [], 0
                self._sync()
                self._file.close()
                self._open_next()
            chunk.append(line)
            chunk_size += len(line)
        if chunk:
            self._file.write(b"".join(chunk))
            self._size += chunk_size
        self._sync()
        self.lines_written += len(lines)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - keep flushing; the error is logged and retried
                log.exception("exposure log flush failed")

    def close(self) -> None:
        """Flush, fsync and close; release the directory lock. Idempotent."""
        with self._buf_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()
        with self._io_lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        self._lockf.close()

    def __enter__(self) -> ExposureLogWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- readers


def exposure_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Exposure files under directories (recursively, ``exposures-*.jsonl``) or given directly."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [q for q in p.rglob(f"{PREFIX}*{SUFFIX}") if _file_number(q) is not None]
            out += sorted(found, key=lambda q: (str(q.parent), _file_number(q)))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"exposure log {p}: no such file or directory")
    return out


def iter_records(paths: str | Path | Iterable[str | Path], stats: dict[str, int] | None = None) -> Iterator[dict]:
    """The records of the exposure files in order; lines that do not parse are skipped and counted
    in ``stats["bad_lines"]`` (e.g. the unterminated last line of a file being written)."""
    bad = 0
    for f in exposure_files(paths):
        with open(f, "rb") as fh:
            for raw in fh:
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except ValueError:
                    bad += 1
                    continue
                if not isinstance(rec, dict) or "user_id" not in rec:
                    bad += 1
                    continue
                yield rec
    if stats is not None:
        stats["bad_lines"] = stats.get("bad_lines", 0) + bad


def read_exposures(paths: str | Path | Iterable[str | Path], experiment: str | None = None) -> pd.DataFrame:
    """Exposure records as one row per shown item.

    Columns: request_id, user_id, experiment, variant, timestamp (datetime64[ns, UTC]), position
    (1-based; 0 for a response that showed nothing: one row with product_id None keeps the user),
    product_id, seller_id, bundle_version (a dict is stored as its JSON), ranker_version.
    ``df.attrs``: ``files`` (count) and ``bad_lines`` (skipped lines).

    Args:
        paths: a log directory, a file, or a list of them.
        experiment: keep only this experiment's records.
    """
    head: dict[str, list[Any]] = {c: [] for c in ("request_id", "user_id", "experiment", "variant", "timestamp",
                                                  "bundle_version", "ranker_version")}
    n_items: list[int] = []
    pos: list[int] = []
    pid: list[Any] = []
    sid: list[Any] = []
    stats: dict[str, int] = {}
    files = exposure_files(paths)
    empty = ({"product_id": None, "seller_id": None, "position": 0},)
    for rec in iter_records(files, stats):
        exp = rec.get("experiment", "")
        if experiment is not None and exp != experiment:
            continue
        bv = rec.get("bundle_version")
        head["request_id"].append(rec.get("request_id"))
        head["user_id"].append(str(rec["user_id"]))
        head["experiment"].append(exp)
        head["variant"].append(rec.get("variant", ""))
        head["timestamp"].append(rec.get("timestamp"))
        head["bundle_version"].append(json.dumps(bv, sort_keys=True) if isinstance(bv, dict) else bv)
        head["ranker_version"].append(rec.get("ranker_version"))
        items = rec.get("items") or empty
        n_items.append(len(items))
        for it in items:
            pos.append(int(it.get("position") or 0))
            pid.append(it.get("product_id"))
            sid.append(it.get("seller_id"))
    rep = np.asarray(n_items, dtype=np.int64)
    data: dict[str, Any] = {}
    for c in COLUMNS:
        if c == "position":
            data[c] = np.asarray(pos, dtype=np.int64)
        elif c == "product_id":
            data[c] = np.asarray(pid, dtype=object)
        elif c == "seller_id":
            data[c] = np.asarray(sid, dtype=object)
        elif c == "timestamp":
            ts = pd.to_numeric(pd.Series(head[c], dtype=object), errors="coerce").to_numpy(np.float64)
            data[c] = pd.to_datetime(np.repeat(ts, rep), unit="s", utc=True)
        else:
            data[c] = np.repeat(np.asarray(head[c], dtype=object), rep)
    df = pd.DataFrame(data, columns=list(COLUMNS))
    df.attrs["files"] = len(files)
    df.attrs["bad_lines"] = stats.get("bad_lines", 0)
    return df


# ---------------------------------------------------------------------------------------------- router

H = TypeVar("H")


@dataclass(frozen=True)
class Route(Generic[H]):
    """Where one request goes: the experiment (``""`` when none runs), the variant and its handler."""

    experiment: str
    variant: str
    handler: H


def _default_items(result: Any) -> Sequence[Any]:
    if hasattr(result, "candidates"):  # retrieval.retriever.RetrievalResult
        return result.candidates
    if isinstance(result, (list, tuple)) and len(result) == 1 and hasattr(result[0], "candidates"):
        return result[0].candidates
    return list(result)


class VariantRouter(Generic[H]):
    """Picks each user's handler by experiment assignment and logs what was shown. Framework-free.

    Handlers are whatever serves a variant (a ``Retriever``, a bundle, a ranker client...). The
    exposure log is optional; without a running experiment (``ab.experiment`` empty or no variants)
    every user goes to ``handlers[default]`` and responses are still logged (experiment ``""``)
    when a log is given.

    Wiring in a service::

        router = VariantRouter.from_config(cfg.ab, {"control": retriever_a, "treatment": retriever_b},
                                           log_dir=cfg.serve.exposure_log,       # "" = no log
                                           rotate_mb=cfg.serve.exposure_rotate_mb)
        # per request
        route = router.route(user_id)                                   # Route(experiment, variant, handler)
        res = route.handler.recommend_products([user_id], k, filters)[0]
        router.record(route, user_id, res.candidates, request_id=rid,
                      bundle_version=versions[route.variant], ranker_version=ranker_version)
        # response headers: X-Experiment: route.experiment, X-Variant: route.variant
        # on shutdown
        router.close()

    or in one call: ``route, res = router.handle(user_id, lambda r: r.recommend_products([user_id], k)[0],
    request_id=rid, bundle_version=...)`` (items are taken from ``res.candidates`` or ``res`` itself).
    Record only what the user is actually shown (after filtering / ranking / truncation to k).
    """

    def __init__(self, ab: ABConfig, handlers: Mapping[str, H], log: ExposureLogWriter | None = None,
                 default: str | None = None):
        self.handlers = dict(handlers)
        if not self.handlers:
            raise ConfigError("VariantRouter: no handlers")
        self.log = log
        self.active = bool(ab.experiment) and bool(ab.variants)
        self.assigner = Assigner.from_config(ab) if self.active else None
        if self.assigner is not None:
            missing = [n for n in self.assigner.names if n not in self.handlers]
            if missing:
                raise ConfigError(f"ab.variants: no handler for variant(s) {missing} (handlers: {sorted(self.handlers)})")
        if default is None:
            default = "control" if "control" in self.handlers else next(iter(self.handlers))
        if default not in self.handlers:
            raise ConfigError(f"VariantRouter: default handler {default!r} not in {sorted(self.handlers)}")
        self.default = default
        self.experiment = ab.experiment if self.active else ""
        self.log_errors = 0

    @classmethod
    def from_config(cls, ab: ABConfig, handlers: Mapping[str, H], log_dir: str | Path = "",
                    rotate_mb: float = 64.0, default: str | None = None, **writer_kwargs: Any) -> VariantRouter[H]:
        """Router with an :class:`ExposureLogWriter` on ``log_dir`` (none when ``log_dir`` is empty)."""
        writer = ExposureLogWriter(log_dir, rotate_mb=rotate_mb, **writer_kwargs) if str(log_dir) else None
        return cls(ab, handlers, writer, default)

    def variant_of(self, user_id: str) -> str:
        return self.assigner.assign(str(user_id)) if self.assigner is not None else self.default

    def route(self, user_id: str) -> Route[H]:
        v = self.variant_of(user_id)
        return Route(self.experiment, v, self.handlers[v])

    def record(self, route: Route[H], user_id: str, items: Sequence[Any], request_id: str | None = None,
               bundle_version: str | Mapping[str, str] | None = None, ranker_version: str | None = None,
               timestamp: float | None = None) -> dict[str, Any] | None:
        """Log what ``user_id`` was shown (no-op without a log). Returns the record, or None.

        Never raises: a failing log (disk full, closed writer, an item without ``product_id``) is
        logged, counted in ``log_errors`` and the request goes on (the response matters more than
        its exposure record; alert on ``log_errors``)."""
        if self.log is None:
            return None
        try:
            return self.log.log_exposure(request_id, user_id, route.experiment, route.variant, items,
                                         bundle_version, ranker_version, timestamp)
        except Exception:  # noqa: BLE001 - see the docstring
            self.log_errors += 1
            log.exception("exposure log: could not record request %s", request_id)
            return None

    def handle(self, user_id: str, fn: Callable[[H], Any], request_id: str | None = None,
               items_of: Callable[[Any], Sequence[Any]] = _default_items, **versions: Any) -> tuple[Route[H], Any]:
        """Route, call ``fn(handler)``, log the items of its result; returns (route, result)."""
        route = self.route(user_id)
        result = fn(route.handler)
        self.record(route, user_id, items_of(result), request_id=request_id, **versions)
        return route, result

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
