"""``recsys index``: FAISS indexes over the exported product and seller vectors, with a recall check.

* Factory strings come from ``retrieval.index_factory`` (``Flat``, ``HNSW32``, ``IVF4096,PQ32x4fs,RFlat``,
  ...). ``""`` chooses by catalog size (:func:`choose_factory`): exact ``Flat`` under 50k items,
  else ``IVF<nlist>,PQ<d/2>x4fs,RFlat`` (4-bit fast-scan PQ re-ranked exactly). It beat HNSW32 at
  100k (recall@100 0.997 at 16x exact vs 0.992 at 11x) and 1M vectors (0.971 at 67x vs 0.947 at
  35x) and builds in half the time (``benchmarks/bench_index.py``, README "Results").
  IVF list counts are adapted to the size (:func:`adapt_factory`: at most one list per 39 vectors,
  FAISS's minimum training points per centroid).
* The metric is always the inner product (``METRIC_INNER_PRODUCT``) on unit vectors, matching the
  towers' score; any other metric is refused (:class:`MetricMismatchError`), at build and at load.
* ``retrieval.index_factory`` applies to the product index; the seller index always uses the size
  rule (seller catalogs are small, so it is exact ``Flat`` in practice).
* Row ``i`` of an index is row ``i`` of the export; ``<kind>_idx.npy`` holds the model indexes
  (the external ids), so FAISS ids are positions and never need an id map.
* At build time recall@K (``retrieval.recall_k``) against exact search is measured on a sample of
  real queries (exported user vectors, ``retrieval.recall_sample_queries``). When it is below
  ``retrieval.recall_floor``, efSearch / nprobe / refine k_factor are raised step by step; if the
  floor is still not reached the build fails with :class:`RecallFloorError`. The tuned settings
  are stored in the index file and the manifest and used by the :class:`~retrieval.retriever.Retriever`.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from recsys.artifacts import ArtifactError, atomic_artifact, read_manifest
from recsys.config import Config, RetrievalConfig
from retrieval.common import METRIC, NORMALISATION, RetrievalError, link_or_copy, load_npy

FLAT_BELOW = 50_000
MIN_POINTS_PER_LIST = 39
MAX_EF_SEARCH = 4096
MAX_K_FACTOR = 64

_METRIC_NAMES = {faiss.METRIC_INNER_PRODUCT: "inner_product", faiss.METRIC_L2: "l2"}


class IndexBuildError(RetrievalError):
    """An index cannot be built or loaded (bad factory string, missing export, ...)."""


class MetricMismatchError(IndexBuildError):
    """The index metric is not the model's inner product on unit vectors."""


class RecallFloorError(IndexBuildError):
    """The index cannot reach ``retrieval.recall_floor`` even with the largest search settings."""


@dataclass(frozen=True)
class SearchSettings:
    """Search-time knobs of an index (those that do not apply to its type are ignored)."""

    ef_search: int = 0
    nprobe: int = 0
    k_factor: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any] | None) -> SearchSettings:
        d = d or {}
        return SearchSettings(int(d.get("ef_search", 0)), int(d.get("nprobe", 0)), float(d.get("k_factor", 0.0)))


# ---------------------------------------------------------------------------------------------- factories


def choose_factory(n: int, d: int) -> str:
    """Index type by catalog size: exact Flat under 50k, else IVF-PQ (4-bit fast scan) with exact refine."""
    if n < FLAT_BELOW:
        return "Flat"
    nlist = 2 ** int(round(math.log2(4 * math.sqrt(n))))
    m = d // 2 if d % 2 == 0 else d
    return f"IVF{nlist},PQ{m}x4fs,RFlat"


def adapt_factory(factory: str, n: int) -> str:
    """Lower ``IVF<nlist>`` to at most ``n / 39`` lists (at least 1) so training has enough points."""

    def fix(m: re.Match) -> str:
        nlist = int(m.group(1))
        return f"IVF{max(1, min(nlist, n // MIN_POINTS_PER_LIST))}"

    return re.sub(r"IVF(\d+)", fix, factory)


def check_metric(index: faiss.Index, where: str) -> None:
    """Refuse an index whose metric is not the inner product."""
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        name = _METRIC_NAMES.get(index.metric_type, str(index.metric_type))
        raise MetricMismatchError(
            f"{where}: index metric is {name!r} but the towers score by the inner product of L2-normalised "
            "vectors (METRIC_INNER_PRODUCT); rebuild the index with `recsys index`"
        )


def build_index(vectors: np.ndarray, factory: str, metric: str = METRIC) -> faiss.Index:
    """Train and fill a FAISS index over ``vectors`` [n, d] float32 (row i gets id i).

    Raises:
        MetricMismatchError: ``metric`` is not the inner product.
        IndexBuildError: FAISS rejects the factory string or cannot train it on n vectors.
    """
    if metric not in (METRIC, "ip", "METRIC_INNER_PRODUCT"):
        raise MetricMismatchError(
            f"index metric {metric!r} does not match the model: the towers score by the inner product of "
            "L2-normalised vectors; use metric 'inner_product'"
        )
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except Exception as e:  # noqa: BLE001 - FAISS raises RuntimeError with a C++ message
        raise IndexBuildError(f"retrieval.index_factory {factory!r} is not a valid FAISS factory string: {e}") from e
    check_metric(index, f"factory {factory!r}")
    try:
        if not index.is_trained and n:
            index.train(x)
        if n:
            index.add(x)
    except Exception as e:  # noqa: BLE001
        raise IndexBuildError(f"cannot train index {factory!r} on {n} vectors of dim {d}: {e}") from e
    if isinstance(faiss.downcast_index(index), faiss.IndexRefine):
        r = faiss.downcast_index(index)
        r.k_factor = max(float(r.k_factor), 4.0)
    return index


# ---------------------------------------------------------------------------------------------- search params


def _inner(index: faiss.Index, cls: type) -> Any:
    """The first sub-index of type ``cls`` through refine / pre-transform / id-map wrappers, or None."""
    index = faiss.downcast_index(index)
    if isinstance(index, cls):
        return index
    if isinstance(index, faiss.IndexRefine):
        return _inner(index.base_index, cls)
    if isinstance(index, (faiss.IndexPreTransform, faiss.IndexIDMap)):
        return _inner(index.index, cls)
    return None


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    return _inner(index, faiss.IndexIVF)


def _hnsw(index: faiss.Index) -> faiss.IndexHNSW | None:
    return _inner(index, faiss.IndexHNSW)


def default_settings(index: faiss.Index, cfg: RetrievalConfig) -> SearchSettings:
    s = SearchSettings()
    if _hnsw(index) is not None:
        s = replace(s, ef_search=int(cfg.hnsw_ef_search))
    ivf = _ivf(index)
    if ivf is not None:
        s = replace(s, nprobe=int(min(cfg.ivf_nprobe, ivf.nlist)))
    refine = _inner(index, faiss.IndexRefine)
    if refine is not None:
        s = replace(s, k_factor=float(refine.k_factor))
    return s


def apply_settings(index: faiss.Index, s: SearchSettings) -> None:
    """Store the settings on the index itself (they are written with it by ``faiss.write_index``)."""
    hnsw, ivf, refine = _hnsw(index), _ivf(index), _inner(index, faiss.IndexRefine)
    if hnsw is not None and s.ef_search:
        hnsw.hnsw.efSearch = int(s.ef_search)
    if ivf is not None and s.nprobe:
        ivf.nprobe = int(s.nprobe)
    if refine is not None and s.k_factor:
        refine.k_factor = float(s.k_factor)


def read_settings(index: faiss.Index) -> SearchSettings:
    hnsw, ivf, refine = _hnsw(index), _ivf(index), _inner(index, faiss.IndexRefine)
    return SearchSettings(
        ef_search=int(hnsw.hnsw.efSearch) if hnsw is not None else 0,
        nprobe=int(ivf.nprobe) if ivf is not None else 0,
        k_factor=float(refine.k_factor) if refine is not None else 0.0,
    )


def _params(index: faiss.Index, s: SearchSettings, k: int, sel: Any, keep: list[Any]) -> faiss.SearchParameters:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        p = faiss.IndexRefineSearchParameters()
        p.k_factor = float(s.k_factor or index.k_factor)
        p.base_index_params = _params(index.base_index, s, int(k * p.k_factor), sel, keep)
    elif isinstance(index, faiss.IndexPreTransform):
        p = faiss.SearchParametersPreTransform()
        p.index_params = _params(index.index, s, k, sel, keep)
    elif isinstance(index, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW()
        p.efSearch = int(max(s.ef_search or index.hnsw.efSearch, k))
        p.sel = sel
    elif isinstance(index, faiss.IndexIVF):
        p = faiss.SearchParametersIVF()
        p.nprobe = int(s.nprobe or index.nprobe)
        p.sel = sel
    else:
        p = faiss.SearchParameters()
        p.sel = sel
    keep.append(p)
    return p


def search_params(
    index: faiss.Index, s: SearchSettings, k: int, sel: faiss.IDSelector | None = None
) -> tuple[faiss.SearchParameters | None, list[Any]]:
    """Per-call search parameters (thread-safe: the index is never mutated), with an optional selector.

    Returns:
        (params, or None for a plain exact search; objects that must stay alive during the search).
    """
    keep: list[Any] = [sel] if sel is not None else []
    if sel is None and isinstance(faiss.downcast_index(index), faiss.IndexFlat):
        return None, keep
    return _params(index, s, k, sel, keep), keep


def search(
    index: faiss.Index, q: np.ndarray, k: int, s: SearchSettings, sel: faiss.IDSelector | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(scores [n, k] float32, positions [n, k] int64; -1 where FAISS found fewer)."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    k = int(min(k, max(index.ntotal, 1)))
    params, keep = search_params(index, s, k, sel)
    D, Ix = index.search(q, k, params=params) if params is not None else index.search(q, k)
    del keep
    return D, Ix


# ---------------------------------------------------------------------------------------------- recall


def recall_from(found: np.ndarray, x: np.ndarray, queries: np.ndarray, kth: np.ndarray) -> float:
    """Mean fraction of the exact top-k found by ``found`` [q, k] (positions, -1 none), given each
    query's exact k-th best score ``kth`` [q, 1]; an item tying the k-th exact score counts as found."""
    k = found.shape[1]
    valid = found >= 0
    true = np.einsum("qd,qkd->qk", queries, x[np.where(valid, found, 0)])
    hit = valid & (true >= kth - 1e-5)
    return float(np.minimum(hit.sum(1), k).mean() / k)


def exact_index(x: np.ndarray) -> faiss.Index:
    """Exact inner-product search over ``x`` (the ground truth of recall and latency comparisons)."""
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    return exact


def recall_at_k(index: faiss.Index, x: np.ndarray, queries: np.ndarray, k: int, s: SearchSettings,
                exact_kth: np.ndarray | None = None) -> float:
    """Mean fraction of the exact top-k found (an item tying the k-th exact score counts as found).

    ``exact_kth`` [q, 1]: each query's exact k-th best score when already known (else computed).
    """
    n = x.shape[0]
    k = int(min(k, n))
    if k == 0 or len(queries) == 0:
        return 1.0
    if exact_kth is None:
        exact_kth = exact_index(x).search(queries, k)[0][:, -1:]
    _, Ia = search(index, queries, k, s)
    return recall_from(Ia, x, queries, exact_kth)


def single_query_latency(index: faiss.Index, exact: faiss.Index, queries: np.ndarray, k: int, s: SearchSettings,
                         n: int = 100) -> dict[str, float]:
    """Milliseconds per single-query search (the serving pattern) at settings ``s``, beside exact search.

    One query at a time on up to ``n`` of ``queries``, in the calling thread's FAISS setting;
    ``exact`` is :func:`exact_index` of the same vectors. Returns p50 / p99 of both and their ratio.
    """
    qs = np.ascontiguousarray(queries[:n], dtype=np.float32)
    if len(qs) == 0 or exact.ntotal == 0:
        return {}
    k = int(min(k, exact.ntotal))

    def timed(fn) -> np.ndarray:
        fn(qs[:1])  # warm up
        out = []
        for i in range(len(qs)):
            t = time.perf_counter()
            fn(qs[i : i + 1])
            out.append(1000 * (time.perf_counter() - t))
        return np.asarray(out)

    a = timed(lambda q: search(index, q, k, s))
    e = timed(lambda q: exact.search(q, k))
    return {"latency_ms_p50": round(float(np.percentile(a, 50)), 4), "latency_ms_p99": round(float(np.percentile(a, 99)), 4),
            "exact_latency_ms_p50": round(float(np.percentile(e, 50)), 4),
            "speedup_vs_exact_p50": round(float(np.percentile(e, 50) / max(np.percentile(a, 50), 1e-9)), 2),
            "latency_queries": int(len(qs))}


def _next_settings(index: faiss.Index, s: SearchSettings, k: int) -> SearchSettings | None:
    """The next, larger search setting to try, or None when every knob is at its maximum."""
    refine = _inner(index, faiss.IndexRefine)
    if _hnsw(index) is not None:
        top = max(MAX_EF_SEARCH, 4 * k)
        if s.ef_search < top:
            return replace(s, ef_search=min(top, max(s.ef_search * 2, k)))
    ivf = _ivf(index)
    if ivf is not None and s.nprobe < ivf.nlist:
        return replace(s, nprobe=min(ivf.nlist, max(1, s.nprobe) * 2))
    if refine is not None and s.k_factor < MAX_K_FACTOR:
        return replace(s, k_factor=min(MAX_K_FACTOR, max(1.0, s.k_factor) * 2))
    return None


def build_tuned(
    vectors: np.ndarray, queries: np.ndarray, factory: str, cfg: RetrievalConfig, what: str = "products"
) -> tuple[faiss.Index, dict[str, Any]]:
    """Build an index, measure recall@K on ``queries`` and tune it up to ``cfg.recall_floor``.

    Returns:
        (index with tuned settings applied, info: factory, n, dim, recall, settings, tuning trace).

    Raises:
        RecallFloorError: recall stays under the floor at the largest settings.
    """
    n, d = vectors.shape
    requested = factory or ""
    factory = adapt_factory(factory or choose_factory(n, d), n)
    t0 = time.time()
    index = build_index(vectors, factory)
    build_s = time.time() - t0
    s = default_settings(index, cfg)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    k = int(min(cfg.recall_k, n))
    exact = exact_index(vectors)  # one ground truth for every tuning step and the latency comparison
    kth = exact.search(q, k)[0][:, -1:] if k > 0 and len(q) else None
    trace = []
    while True:
        r = recall_at_k(index, vectors, q, k, s, kth)
        trace.append({**s.to_dict(), "recall": round(r, 5)})
        if r >= cfg.recall_floor:
            break
        nxt = _next_settings(index, s, k)
        if nxt is None:
            raise RecallFloorError(
                f"{what} index {factory!r}: recall@{k} = {r:.4f} is under retrieval.recall_floor "
                f"{cfg.recall_floor} even at the largest search settings {s.to_dict()} "
                f"({len(q)} queries); use a less lossy retrieval.index_factory (e.g. 'HNSW32' or 'Flat') "
                "or lower retrieval.recall_floor"
            )
        s = nxt
    apply_settings(index, s)
    info = {
        "factory": factory,
        "requested_factory": requested,
        "n": int(n),
        "dim": int(d),
        "metric": METRIC,
        "recall_k": k,
        "recall": round(r, 5),
        "recall_floor": cfg.recall_floor,
        "recall_queries": int(len(q)),
        "settings": s.to_dict(),
        "tuning": trace,
        "build_seconds": round(build_s, 3),
        # single-query search time at the tuned settings (what the report shows beside recall)
        **single_query_latency(index, exact, q, k, s),
    }
    return index, info


def load_index(path: Path, n: int | None = None, dim: int | None = None) -> faiss.Index:
    """``faiss.read_index`` with checks of metric, size and dimension."""
    path = Path(path)
    if not path.exists():
        raise IndexBuildError(f"index file {path} is missing")
    try:
        index = faiss.read_index(str(path))
    except Exception as e:  # noqa: BLE001
        raise IndexBuildError(f"cannot read FAISS index {path}: {e}") from e
    check_metric(index, str(path))
    if n is not None and index.ntotal != n:
        raise IndexBuildError(f"{path}: index holds {index.ntotal} vectors but the export has {n}")
    if dim is not None and index.d != dim:
        raise IndexBuildError(f"{path}: index dimension {index.d} differs from the export's {dim}")
    return index


def sample_queries(users: np.ndarray, fallback: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` real query vectors: exported users (else the items themselves), sampled with a seed."""
    src = users if len(users) else fallback
    if len(src) == 0:
        return np.zeros((0, fallback.shape[1]), np.float32)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(src), min(n, len(src)), replace=False))
    return np.ascontiguousarray(src[rows], dtype=np.float32)


def with_offsets(x: np.ndarray, offsets: np.ndarray | None) -> np.ndarray:
    """Products' or queries' vectors extended by the score offset dimension.

    A product row becomes ``[p, offset_p]`` and a query ``[u, 1]`` (``offsets`` None), so the inner
    product is ``cos(u, p) + offset_p``: the model's product score (the popularity prior) in the same
    inner-product index.

    Args:
        x: [n, d] float32.
        offsets: [n] float32, or None for queries.
    Returns:
        [n, d + 1] float32, C-contiguous.
    """
    extra = np.ones((len(x), 1), np.float32) if offsets is None else np.asarray(offsets, np.float32).reshape(-1, 1)
    if len(extra) != len(x):
        raise IndexBuildError(f"{len(extra)} product offsets for {len(x)} product vectors")
    return np.ascontiguousarray(np.hstack([np.asarray(x, np.float32), extra]))


def run(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Build the product and seller indexes from ``RUN_DIR/export``; write ``RUN_DIR/index``.

    Returns:
        The index manifest (per kind: factory, recall@K, settings, sizes).

    Raises:
        IndexBuildError: no export; MetricMismatchError: export not unit vectors / inner product;
        RecallFloorError: recall under ``retrieval.recall_floor``.
    """
    run_dir = Path(run_dir)
    exp = run_dir / "export"
    try:
        eman = read_manifest(exp, verify=True)
    except ArtifactError as e:
        raise IndexBuildError(f"cannot build indexes: {e} (run `recsys export` first)") from e
    if eman.get("metric", METRIC) != METRIC or eman.get("normalisation") != NORMALISATION:
        raise MetricMismatchError(
            f"{exp}: export has metric {eman.get('metric')!r} / normalisation {eman.get('normalisation')!r}; "
            f"the indexes need {METRIC!r} on {NORMALISATION!r}-normalised vectors"
        )
    rcfg = cfg.retrieval
    users = load_npy(exp / "users.npy", mmap=True)  # only a sample is read
    manifest: dict[str, Any] = {
        "stage": "index",
        "model_version": eman.get("model_version"),
        "vocab_fingerprint": eman.get("vocab_fingerprint"),
        "export_created_at": eman.get("created_at"),
        "dim": eman.get("dim"),
        "metric": METRIC,
        "indexes": {},
    }
    with atomic_artifact(run_dir / "index", manifest) as tmp:
        for kind in ("products", "sellers"):
            x = np.ascontiguousarray(load_npy(exp / f"{kind}.npy"), dtype=np.float32)
            q = sample_queries(users, x, rcfg.recall_sample_queries, seed=17)
            if kind == "products":
                x, q = with_offsets(x, load_npy(exp / "products_offsets.npy")), with_offsets(q, None)
            # Sellers are few: the configured factory is for the product catalog; sellers use the size rule.
            factory = rcfg.index_factory if kind == "products" else ""
            index, info = build_tuned(x, q, factory, rcfg, kind)
            faiss.write_index(index, str(tmp / f"{kind}.faiss"))
            link_or_copy(exp / f"{kind}_idx.npy", tmp / f"{kind}_idx.npy")
            manifest["indexes"][kind] = info
    out = read_manifest(run_dir / "index")
    out["path"] = str(run_dir / "index")
    return out
