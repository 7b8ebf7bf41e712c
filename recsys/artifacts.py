"""Versioned artifact directories: atomic commit, manifest with config, row counts and checksums.

Every stage writes its output through :func:`atomic_artifact`: files go to a temporary sibling
directory, the manifest is written last, and the directory is renamed into place, so a crash
never leaves a half-written directory that looks complete (a directory without a manifest, or with
checksums that do not match, is refused by :func:`read_manifest`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """An artifact directory is missing, incomplete or does not match its manifest."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def file_checksums(root: str | Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``root`` except the manifest, keyed by relative path."""
    root = Path(root)
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".") and not p.name.endswith(".crc"):
            out[str(p.relative_to(root))] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    directory = Path(directory)
    full = dict(manifest)
    full.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    full["files"] = file_checksums(directory)
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
    os.replace(tmp, directory / MANIFEST)
    return full


def read_manifest(directory: str | Path, verify: bool = False) -> dict[str, Any]:
    """Read an artifact's manifest; with ``verify`` also check every file's checksum.

    Raises:
        ArtifactError: naming the directory and the file that is missing or differs.
    """
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.exists():
        raise ArtifactError(f"{directory}: no {MANIFEST}; the artifact is missing or was not completed")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath}: corrupt manifest ({e})") from e
    if verify:
        for rel, meta in manifest.get("files", {}).items():
            p = directory / rel
            if not p.exists():
                raise ArtifactError(f"{directory}: file {rel} listed in the manifest is missing")
            if p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
                raise ArtifactError(f"{directory}: checksum mismatch for {rel}")
    return manifest


@contextlib.contextmanager
def atomic_artifact(final: str | Path, manifest: dict[str, Any]) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success write the manifest and move it to ``final``.

    Args:
        final: the artifact directory to (re)place.
        manifest: base manifest content; the context body may add keys to it before exiting.

    Yields:
        The temporary directory path.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp, manifest)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def input_fingerprint(paths: list[str | Path]) -> str:
    """Hash of names, sizes and mtimes of input files: cheap change detection for stage skipping."""
    h = hashlib.sha256()
    for p in sorted(str(x) for x in paths):
        pp = Path(p)
        files = sorted(pp.rglob("*")) if pp.is_dir() else [pp]
        for f in files:
            if f.is_file():
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]
