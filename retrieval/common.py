"""Small shared helpers of the retrieval package (no torch, no Spark, no Lightning).

Everything here reads Parquet with pyarrow and NumPy, and never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.schema import EVENT_CODE
from recsys.config import fingerprint

KINDS = ("products", "sellers", "users")
METRIC = "inner_product"
NORMALISATION = "l2"


class RetrievalError(RuntimeError):
    """Base class of the retrieval package's errors (the message names the file or key at fault)."""


def event_codes(names: tuple[str, ...] | list[str]) -> np.ndarray:
    """Event-type names (``view``/``cart``/``purchase``) to their int8 codes; unknown names are ignored."""
    return np.asarray([EVENT_CODE[n] for n in names if n in EVENT_CODE], dtype=np.int64)


def vocab_fingerprint_from_files(files: dict[str, dict[str, Any]]) -> str:
    """The same vocabulary fingerprint as ``towers.train.vocab_fingerprint`` (from manifest file entries).

    Args:
        files: a manifest's ``files`` mapping (relative path -> {sha256, bytes}).
    """
    vocab = {k: v["sha256"] for k, v in sorted(files.items()) if k.startswith("vocab/")}
    return fingerprint(vocab)


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table | None:
    """A Parquet file or folder as a table, or None when it does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    if columns is not None:
        names = pq.read_schema(path).names if path.is_file() else None
        if names is not None:
            columns = [c for c in columns if c in names]
    return pq.read_table(path, columns=columns)


def column(t: pa.Table, name: str, dtype: Any, fill: Any = 0) -> np.ndarray:
    """A column as a NumPy array with nulls replaced by ``fill``."""
    c = t[name]
    if c.null_count:
        c = c.fill_null(fill)
    return np.asarray(c.to_numpy(), dtype=dtype)


def read_vocab(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids as an object array of str, indexes int64), sorted by index; empty when the file is missing."""
    t = read_table(path, ["id", "index"])
    if t is None or t.num_rows == 0:
        return np.zeros(0, dtype=object), np.zeros(0, dtype=np.int64)
    idx = column(t, "index", np.int64)
    ids = np.asarray(t["id"].to_pylist(), dtype=object)
    order = np.argsort(idx, kind="stable")
    return ids[order], idx[order]


def save_npy(path: Path, arr: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(arr), allow_pickle=False)


def load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (same filesystem; artifacts are never modified in place), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def model_version(model_manifest: dict[str, Any], desc: dict[str, Any]) -> str:
    """A short id of a trained model: hash of its manifest's created_at and config/vocab fingerprints."""
    blob = json.dumps(
        {
            "created_at": model_manifest.get("created_at"),
            "config_fingerprint": desc.get("config_fingerprint"),
            "vocab_fingerprint": desc.get("vocab_fingerprint"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def max_history(desc: dict[str, Any], default: int) -> int:
    """The history width the towers were trained with (model.json's config), else ``default``."""
    try:
        return int(desc["config"]["data"]["max_history"])
    except (KeyError, TypeError, ValueError):
        return int(default)


_RID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_from_scope(scope) -> str:
    """The request's X-Request-ID when it is a safe token, else a new one (both services use this)."""
    for k, v in scope.get("headers", ()):
        if k == b"x-request-id":
            s = v.decode("latin-1").strip()
            if _RID.match(s):
                return s
            break
    return uuid.uuid4().hex
