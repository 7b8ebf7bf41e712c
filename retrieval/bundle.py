"""Serving bundles: everything retrieval needs, versioned, checksummed and swapped atomically.

Layout of ``RUN_DIR/bundles/<version>/`` (written with :func:`recsys.artifacts.atomic_artifact`)::

    export/    {products,sellers,users}.npy, *_idx.npy, products_offsets.npy, {kind}_ids.parquet (id column),
               export.json
    index/     {products,sellers}.faiss (products: dim + 1, the last dimension the score offset), {products,sellers}_idx.npy, index.json
    vocab/     every vocabulary of the prepared artifact (users, products, sellers, categories, brands)
    model/     towers.pt, model.json, model_manifest.json   (the user tower for recent-history queries)
    serving/   products, sellers, offers, popularity, seller_popularity, histories (.parquet)
    manifest.json   version, model version, vocabulary fingerprint, dim, metric, counts, index recall,
                    checksums of every file

``RUN_DIR/bundles/CURRENT`` names the live version (one line), replaced atomically.

:func:`load_bundle` verifies every checksum, that model, export and index come from the same model
version, and that the vocabulary fingerprint of the model equals the export's and the bundled
vocabularies'. Anything else raises :class:`BundleError`. Nothing is unpickled: FAISS files via
``faiss.read_index``, arrays via ``np.load(allow_pickle=False)``, weights via ``load_towers``
(``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.artifacts import MANIFEST, ArtifactError, atomic_artifact, read_manifest
from recsys.config import Config
from retrieval import export as export_mod
from retrieval import faiss_index
from retrieval.common import (
    METRIC,
    RetrievalError,
    link_or_copy,
    load_npy,
    model_version,
    read_vocab,
    vocab_fingerprint_from_files,
)
from retrieval.faiss_index import SearchSettings
from retrieval.marketplace import ServingTables
from towers.checkpoint import serving_model_dir

CURRENT = "CURRENT"
BUNDLE_FORMAT = 2


class BundleError(RetrievalError):
    """A bundle is missing, corrupt (checksums) or inconsistent (model / export / vocabulary mismatch)."""


@dataclass
class Bundle:
    """A loaded, verified bundle (or one assembled in memory for tests).

    Row ``i`` of ``*_vectors`` / ``*_ids`` / ``*_idx`` is position ``i``; the FAISS indexes use positions as ids.
    """

    version: str
    dim: int
    product_ids: np.ndarray
    product_idx: np.ndarray
    product_vectors: np.ndarray
    product_index: Any
    seller_ids: np.ndarray
    seller_idx: np.ndarray
    seller_vectors: np.ndarray
    seller_index: Any
    user_ids: np.ndarray
    user_idx: np.ndarray
    user_vectors: np.ndarray
    tables: ServingTables
    categories: tuple[np.ndarray, np.ndarray] = field(
        default_factory=lambda: (np.zeros(0, dtype=object), np.zeros(0, np.int64))
    )
    product_settings: SearchSettings = field(default_factory=SearchSettings)
    seller_settings: SearchSettings = field(default_factory=SearchSettings)
    model: Any = None
    max_history: int = 50
    path: Path | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    # [P] added to each product's inner product (the popularity prior); None = zeros. A product index
    # of dimension dim + 1 holds them as its last dimension (faiss_index.with_offsets).
    product_offsets: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------- paths


def bundles_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "bundles"


def current_bundle_path(run_dir_or_bundles: str | Path) -> Path | None:
    """The live bundle named by ``CURRENT`` (given a run dir or a bundles dir), or None."""
    p = Path(run_dir_or_bundles)
    for d in (p, p / "bundles"):
        cur = d / CURRENT
        if cur.is_file():
            name = cur.read_text().strip()
            if name and (d / name).is_dir():
                return d / name
    return None


def resolve_bundle_path(path: str | Path) -> Path:
    """A bundle dir itself, else the ``CURRENT`` one of a bundles dir or a run dir."""
    p = Path(path)
    if (p / MANIFEST).is_file() and (p / "export").is_dir() and (p / "index").is_dir():
        return p
    cur = current_bundle_path(p)
    if cur is None:
        raise BundleError(
            f"{p}: not a bundle directory and no bundles/{CURRENT} found (build one with `recsys bundle` "
            "or `recsys recommend`, which builds it)"
        )
    return cur


def set_current(bundles: Path, version: str) -> None:
    """Point ``bundles/CURRENT`` at ``version`` (write a temp file, then an atomic rename)."""
    tmp = bundles / f".{CURRENT}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(version + "\n")
    os.replace(tmp, bundles / CURRENT)


# ---------------------------------------------------------------------------------------------- build


def build(cfg: Config, run_dir: str | Path, version: str | None = None, make_current: bool = True) -> dict[str, Any]:
    """Assemble ``RUN_DIR/bundles/<version>`` from the run's model, export and index (which must exist).

    Returns:
        The bundle manifest plus ``path``.

    Raises:
        BundleError: export / index missing or built from another model version.
    """
    run_dir = Path(run_dir)
    try:
        mman = read_manifest(serving_model_dir(run_dir), verify=True)
        eman = read_manifest(run_dir / "export", verify=True)
        iman = read_manifest(run_dir / "index", verify=True)
    except ArtifactError as e:
        raise BundleError(f"cannot build a bundle: {e}") from e
    desc = json.loads((serving_model_dir(run_dir) / "model.json").read_text())
    mver = model_version(mman, desc)
    if eman.get("model_version") != mver:
        raise BundleError(
            f"{run_dir / 'export'} was made from model version {eman.get('model_version')}, the model is {mver}; "
            "rerun `recsys export` and `recsys index`"
        )
    if iman.get("model_version") != mver:
        raise BundleError(
            f"{run_dir / 'index'} was built from model version {iman.get('model_version')}, the model is {mver}; "
            "rerun `recsys index`"
        )
    prepared = Path(eman.get("prepared") or desc.get("prepared", ""))
    try:
        pman = read_manifest(prepared)
    except ArtifactError as e:
        raise BundleError(f"cannot build a bundle: prepared artifact: {e}") from e
    bundles = bundles_dir(run_dir)
    version = version or f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{mver[:8]}"
    base, i = version, 1
    while (bundles / version).exists():
        i += 1
        version = f"{base}-{i}"
    manifest: dict[str, Any] = {
        "stage": "bundle",
        "format": BUNDLE_FORMAT,
        "version": version,
        "model_version": mver,
        "vocab_fingerprint": eman.get("vocab_fingerprint"),
        "dim": eman.get("dim"),
        "metric": METRIC,
        "normalisation": eman.get("normalisation"),
        "max_history": eman.get("max_history"),
        "counts": eman.get("counts"),
        "indexes": {
            k: {kk: v.get(kk) for kk in ("factory", "recall_k", "recall", "settings", "n")}
            for k, v in iman.get("indexes", {}).items()
        },
        "run_dir": str(run_dir.resolve()),
        "prepared": str(prepared.resolve()),
    }
    with atomic_artifact(bundles / version, manifest) as tmp:
        exp = run_dir / "export"
        for kind in ("products", "sellers", "users"):
            for suffix in (".npy", "_idx.npy") + (("_offsets.npy",) if kind == "products" else ()):
                link_or_copy(exp / f"{kind}{suffix}", tmp / "export" / f"{kind}{suffix}")
            ids = pq.read_table(exp / f"{kind}.parquet", columns=["id"])
            pq.write_table(ids, tmp / "export" / f"{kind}_ids.parquet")
        (tmp / "export" / "export.json").write_text(json.dumps(eman, indent=2, sort_keys=True))
        for kind in ("products", "sellers"):
            link_or_copy(run_dir / "index" / f"{kind}.faiss", tmp / "index" / f"{kind}.faiss")
            link_or_copy(run_dir / "index" / f"{kind}_idx.npy", tmp / "index" / f"{kind}_idx.npy")
        (tmp / "index" / "index.json").write_text(json.dumps(iman, indent=2, sort_keys=True))
        for rel in pman.get("files", {}):
            if rel.startswith("vocab/"):
                link_or_copy(prepared / rel, tmp / rel)
        for name in ("towers.pt", "model.json"):
            link_or_copy(serving_model_dir(run_dir) / name, tmp / "model" / name)
        (tmp / "model" / "model_manifest.json").write_text(json.dumps(mman, indent=2, sort_keys=True))
        manifest["serving"] = ServingTables.write_from_prepared(prepared, tmp / "serving", cfg.data.event_weights)
    if make_current:
        set_current(bundles, version)
    out = read_manifest(bundles / version)
    out["path"] = str(bundles / version)
    return out


def ensure_bundle(cfg: Config, run_dir: str | Path) -> Path:
    """The live bundle of a run; when there is none, builds export, index (if missing or stale) and a bundle."""
    cur = current_bundle_path(run_dir)
    if cur is not None:
        return cur
    return Path(run(cfg, run_dir)["path"])


# ---------------------------------------------------------------------------------------------- load


def _ids(path: Path) -> np.ndarray:
    return np.asarray(pq.read_table(path, columns=["id"])["id"].to_pylist(), dtype=object)


def load_bundle(path: str | Path, load_model: bool = True) -> Bundle:
    """Load and verify a bundle (a bundle dir, a bundles dir or a run dir with ``bundles/CURRENT``).

    Raises:
        BundleError: missing, corrupt (checksum), or model / export / index / vocabulary mismatch.
    """
    p = resolve_bundle_path(path)
    try:
        man = read_manifest(p, verify=True)
    except ArtifactError as e:
        raise BundleError(f"refusing bundle {p}: {e}") from e
    if man.get("stage") != "bundle":
        raise BundleError(f"refusing bundle {p}: manifest stage is {man.get('stage')!r}, not 'bundle'")
    if int(man.get("format", 1)) < BUNDLE_FORMAT:
        raise BundleError(
            f"refusing bundle {p}: format {man.get('format', 1)} predates the product score offsets (format "
            f"{BUNDLE_FORMAT}); rebuild it with `recsys export`, `recsys index` and `recsys bundle`"
        )
    try:
        eman = json.loads((p / "export" / "export.json").read_text())
        iman = json.loads((p / "index" / "index.json").read_text())
        desc = json.loads((p / "model" / "model.json").read_text())
        mman = json.loads((p / "model" / "model_manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"refusing bundle {p}: {e}") from e
    vfp_files = vocab_fingerprint_from_files(man.get("files", {}))
    fps = {
        "bundled vocabularies": vfp_files,
        "model": desc.get("vocab_fingerprint"),
        "export": eman.get("vocab_fingerprint"),
        "bundle manifest": man.get("vocab_fingerprint"),
    }
    if len({v for v in fps.values()}) != 1:
        raise BundleError(
            f"refusing bundle {p}: vocabulary fingerprint mismatch ({', '.join(f'{k}={v}' for k, v in fps.items())}); "
            "the model, its export and the vocabularies must come from the same prepared artifact"
        )
    mver = model_version(mman, desc)
    vers = {"model": mver, "export": eman.get("model_version"), "index": iman.get("model_version"),
            "bundle manifest": man.get("model_version")}
    if len(set(vers.values())) != 1:
        raise BundleError(
            f"refusing bundle {p}: model version mismatch ({', '.join(f'{k}={v}' for k, v in vers.items())})"
        )
    dim = int(man["dim"])
    arrays: dict[str, Any] = {}
    try:
        for kind in ("products", "sellers", "users"):
            # user vectors are only looked up by row: memory-map them (they can be the largest array)
            vec = load_npy(p / "export" / f"{kind}.npy", mmap=kind == "users")
            idx = load_npy(p / "export" / f"{kind}_idx.npy").astype(np.int64)
            ids = _ids(p / "export" / f"{kind}_ids.parquet")
            if vec.ndim != 2 or vec.shape[1] != dim or not (len(vec) == len(idx) == len(ids)):
                raise BundleError(f"refusing bundle {p}: export/{kind} arrays disagree in shape")
            if vec.dtype != np.float32:
                raise BundleError(f"refusing bundle {p}: export/{kind}.npy is {vec.dtype}, not float32")
            arrays[kind] = (ids, idx, vec if kind == "users" else np.ascontiguousarray(vec))
        offsets = load_npy(p / "export" / "products_offsets.npy").astype(np.float32)
        if offsets.shape != (len(arrays["products"][1]),):
            raise BundleError(f"refusing bundle {p}: export/products_offsets.npy has shape {offsets.shape}, "
                              f"not ({len(arrays['products'][1])},)")
        indexes = {}
        for kind in ("products", "sellers"):
            # the product index holds one more dimension: the score offset (faiss_index.with_offsets)
            ix = faiss_index.load_index(p / "index" / f"{kind}.faiss", n=len(arrays[kind][1]),
                                        dim=dim + (kind == "products"))
            if not np.array_equal(load_npy(p / "index" / f"{kind}_idx.npy"), arrays[kind][1]):
                raise BundleError(f"refusing bundle {p}: index/{kind}_idx.npy differs from the export's row order")
            settings = SearchSettings.from_dict(iman.get("indexes", {}).get(kind, {}).get("settings"))
            indexes[kind] = (ix, settings)
    except faiss_index.IndexBuildError as e:
        raise BundleError(f"refusing bundle {p}: {e}") from e
    except (ValueError, OSError, pa.ArrowInvalid) as e:
        raise BundleError(f"refusing bundle {p}: {e}") from e
    model = None
    if load_model:
        from towers.checkpoint import load_towers

        try:
            model, _ = load_towers(p / "model")
        except Exception as e:  # noqa: BLE001 - any failure to rebuild the towers refuses the bundle
            raise BundleError(f"refusing bundle {p}: cannot load the user tower: {e}") from e
    return Bundle(
        version=str(man["version"]),
        dim=dim,
        product_ids=arrays["products"][0],
        product_idx=arrays["products"][1],
        product_vectors=arrays["products"][2],
        product_offsets=offsets,
        product_index=indexes["products"][0],
        product_settings=indexes["products"][1],
        seller_ids=arrays["sellers"][0],
        seller_idx=arrays["sellers"][1],
        seller_vectors=arrays["sellers"][2],
        seller_index=indexes["sellers"][0],
        seller_settings=indexes["sellers"][1],
        user_ids=arrays["users"][0],
        user_idx=arrays["users"][1],
        user_vectors=arrays["users"][2],
        tables=ServingTables.read(p / "serving"),
        categories=read_vocab(p / "vocab" / "categories.parquet"),
        model=model,
        max_history=int(man.get("max_history") or 50),
        path=p,
        manifest=man,
    )


def run(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """``recsys bundle --run RUN_DIR``: export and index when missing or stale, then a new bundle made CURRENT."""
    run_dir = Path(run_dir)
    mdesc = serving_model_dir(run_dir) / "model.json"
    desc = json.loads(mdesc.read_text()) if mdesc.exists() else {}
    try:
        mver = model_version(read_manifest(serving_model_dir(run_dir)), desc)
    except ArtifactError as e:
        raise BundleError(f"cannot build a bundle: {e} (run `recsys train` first)") from e
    for d, fn in ((run_dir / "export", export_mod.run), (run_dir / "index", faiss_index.run)):
        try:
            fresh = read_manifest(d).get("model_version") == mver
        except ArtifactError:
            fresh = False
        if not fresh:
            fn(cfg, run_dir)
    return build(cfg, run_dir)
