"""The retrieval library: the one interface used by ``recsys recommend``, the API and the ranking stage.

Stable public API (keep signatures; add only keyword arguments with defaults)::

    Filters(exclude_bought=True, in_stock=False, categories=(), min_price=None, max_price=None,
            min_seller_rating=None, max_per_seller=0)
    Candidate(product_id, score, rank, seller_id, price)
    RetrievalResult(user_id, candidates, fallback)
    SellerCandidate(seller_id, score, rank);  SellerResult(user_id, sellers, fallback)
    ProductOffer(seller_id, score, rank, price, stock, shipping_days, rating, buy_box)

    r = Retriever(bundle, cfg)            # cfg: RetrievalConfig (or a whole Config)
    r.user_vectors(user_ids, recent_products=None) -> (vectors [U, d] float32, known [U] bool)
    r.recommend_products(user_ids, k, filters=Filters(), recent_products=None) -> list[RetrievalResult]
    r.topk_products(user_ids, k, filters, recent_products) -> TopK        # same, as arrays (batch jobs)
    r.product_ids_at(pos), r.product_idx_at(pos), r.seller_ids_of_idx(sidx)  # TopK arrays -> ids / indexes
    r.recommend_sellers(user_ids, k, recent_products=None) -> list[SellerResult]
    r.sellers_for_product(product_id, user_id=None, k=10) -> list[ProductOffer]
    r.similar_products(product_id, k, filters=Filters(), user_id=None) -> list[Candidate]

Semantics:

* Scores are inner products of unit vectors (the towers' cosine), higher is better; ranks are 1-based.
* A user is *known* when the model knows the id (its exported vector, from id + full history) or
  recent products are given (the user tower recomputes the vector from the id, the full history and
  the recent products, most recent last). Others get the popular list under the same filters,
  flagged ``fallback=True`` (score = popularity / max popularity).
* Filters return exactly ``k`` items whenever at least ``k`` items pass them (FAISS ``-1`` slots
  are never returned): the search over-fetches, applies an ``IDSelectorBitmap`` where the index
  supports it, and falls back to exact search over the allowed subset for rows that come up short
  (and directly for very selective filters).
* ``exclude_bought``: products of the user's ``histories/full`` events whose type is in
  ``data.bought_events``. ``in_stock``: the product has an offer with stock != 0 (-1 = unknown counts
  as in stock; without any offers data the filter is a no-op). ``categories``: category path
  prefixes (``"a"``, ``"a > b"``) from ``vocab/categories``, matching any level. ``min_price`` /
  ``max_price``: some offer's price (else the catalog price) is in range. ``min_seller_rating``:
  some offer is from a seller rated >= x. Each candidate carries the best offer (by
  ``retrieval.offer_policy``) among the offers that pass the filters. ``max_per_seller`` caps
  products per best-offer seller in one list (0 = ``retrieval.max_per_seller``; 0 there = no cap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pandas as pd

from recsys.config import Config, RetrievalConfig
from retrieval import faiss_index
from retrieval.bundle import Bundle
from retrieval.marketplace import FilterState, Marketplace

EXACT_BELOW = 8192  # allowed subsets up to this size are searched exactly
SELECTIVE_FRACTION = 0.02  # ... and so are subsets under this fraction of the catalog
EXACT_CHUNK = 1 << 24  # scores held at once in exact search (rows x allowed)
SUBSET_MAX = 65536  # largest allowed subset whose vectors are cached per filter for exact search
SMALL_BATCH = 16  # up to this many rows, exact search is one NumPy product; above, FAISS k-NN on the subset
BATCH_CHUNK = 4096  # rows per FAISS exact k-NN call


class UnknownItemError(LookupError):
    """A product id that the bundle does not know."""


@dataclass(frozen=True)
class Filters:
    """Product filters; see the module docstring for the exact semantics of each field."""

    exclude_bought: bool = True
    in_stock: bool = False
    categories: tuple[str, ...] = ()
    min_price: float | None = None
    max_price: float | None = None
    min_seller_rating: float | None = None
    max_per_seller: int = 0


@dataclass(frozen=True)
class Candidate:
    product_id: str
    score: float
    rank: int
    seller_id: str | None
    price: float | None


@dataclass(frozen=True)
class RetrievalResult:
    user_id: str | None
    candidates: list[Candidate]
    fallback: bool


@dataclass(frozen=True)
class SellerCandidate:
    seller_id: str
    score: float
    rank: int


@dataclass(frozen=True)
class SellerResult:
    user_id: str | None
    sellers: list[SellerCandidate]
    fallback: bool


@dataclass(frozen=True)
class ProductOffer:
    """One seller of a product: the offer's data and the model's affinity score."""

    seller_id: str
    score: float
    rank: int
    price: float | None
    stock: int | None
    shipping_days: float | None
    rating: float | None
    buy_box: bool


@dataclass
class TopK:
    """Array form of a batch of product lists (row per user).

    Attributes:
        positions: [U, k] int64 product positions, -1 where fewer than k items pass the filters.
        scores: [U, k] float32. seller_idx: [U, k] int64 (0 none). price: [U, k] float32 (NaN unknown).
        fallback: [U] bool. counts: [U] number of filled slots.
    """

    positions: np.ndarray
    scores: np.ndarray
    seller_idx: np.ndarray
    price: np.ndarray
    fallback: np.ndarray
    counts: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


def _opt(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _lookup(index: pd.Index, ids: list[str]) -> np.ndarray:
    """Positions of ids in a unique ``pd.Index`` (-1 unknown); per-item hash lookups for small lists."""
    if len(ids) <= 32:
        out = np.full(len(ids), -1, np.int64)
        for i, x in enumerate(ids):
            if x is None:
                continue
            try:
                out[i] = index.get_loc(str(x))
            except KeyError:
                pass
        return out
    return np.asarray(index.get_indexer(pd.Index([str(x) if x is not None else "" for x in ids], dtype=object)), np.int64)


# ---------------------------------------------------------------------------------------------- selection


def _apply_cap(valid: np.ndarray, seller: np.ndarray, cap: int) -> np.ndarray:
    """Keep at most ``cap`` valid entries per (row, seller > 0), in column order."""
    r, j = np.nonzero(valid)
    if len(r) == 0:
        return valid
    s = seller[r, j]
    key = r.astype(np.int64) * (int(seller.max(initial=0)) + 1) + s
    order = np.lexsort((j, key))
    ks = key[order]
    start = np.r_[True, ks[1:] != ks[:-1]]
    idx = np.arange(len(ks))
    cc = idx - np.maximum.accumulate(np.where(start, idx, 0))
    cum = np.empty_like(cc)
    cum[order] = cc
    drop = (cum >= cap) & (s > 0)
    out = valid.copy()
    out[r[drop], j[drop]] = False
    return out


def _member(keys: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Elementwise ``q in keys`` for sorted unique ``keys``."""
    if len(keys) == 0:
        return np.zeros(q.shape, bool)
    i = np.clip(np.searchsorted(keys, q), 0, len(keys) - 1)
    return keys[i] == q


def _select(
    C: np.ndarray,
    D: np.ndarray,
    rows: np.ndarray,
    mask: np.ndarray | None,
    ex_keys: np.ndarray,
    P: int,
    cap: int,
    seller: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First k valid candidates per row (C, D sorted best first). Returns (positions, scores, counts)."""
    valid = C >= 0
    Cc = np.where(valid, C, 0)
    if mask is not None:
        valid &= mask[Cc]
    if len(ex_keys):
        valid &= ~_member(ex_keys, rows[:, None].astype(np.int64) * P + Cc)
    if cap > 0:
        valid = _apply_cap(valid, seller[Cc], cap)
    R, m = C.shape
    pos = np.full((R, k), -1, np.int64)
    sc = np.full((R, k), np.nan, np.float32)
    if R == 1:  # the API's case: no sort needed
        j = np.flatnonzero(valid[0])[:k]
        pos[0, : len(j)] = C[0, j]
        sc[0, : len(j)] = D[0, j]
        return pos, sc, np.array([len(j)], np.int64)
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    ok = np.take_along_axis(valid, order, 1)
    w = order.shape[1]
    pos[:, :w] = np.where(ok, np.take_along_axis(C, order, 1), -1)
    sc[:, :w] = np.where(ok, np.take_along_axis(D, order, 1), np.float32(np.nan))
    return pos, sc, ok.sum(1)


class Retriever:
    """Candidate retrieval over a loaded :class:`~retrieval.bundle.Bundle` (thread-safe, read-only).

    Args:
        bundle: a verified bundle (``retrieval.bundle.load_bundle``).
        cfg: ``RetrievalConfig`` (or a whole ``Config``; then ``data.bought_events`` is taken from it).
        bought_events: event types that mean "already bought" (when ``cfg`` is a ``RetrievalConfig``).
    """

    def __init__(self, bundle: Bundle, cfg: RetrievalConfig | Config, bought_events: tuple[str, ...] | None = None):
        if isinstance(cfg, Config):
            bought_events = bought_events or tuple(cfg.data.bought_events)
            cfg = cfg.retrieval
        self.cfg = cfg
        self.bundle = bundle
        self.version = bundle.version
        self.dim = bundle.dim
        self.market = Marketplace(
            bundle.tables,
            bundle.product_idx,
            bundle.seller_idx,
            bundle.categories,
            cfg.offer_policy,
            tuple(bought_events or ("purchase",)),
        )
        self.P = len(bundle.product_idx)
        self.S = len(bundle.seller_idx)
        self.vectors = np.ascontiguousarray(bundle.product_vectors, dtype=np.float32)
        # A product index one dimension wider than the vectors scores cos + offset (the popularity
        # prior): exact search then uses the same extended vectors and queries get a trailing 1.
        self._offset_dim = int(bundle.product_index.d) == self.vectors.shape[1] + 1
        if self._offset_dim:
            off = bundle.product_offsets if bundle.product_offsets is not None else np.zeros(len(self.vectors), np.float32)
            self.search_vectors = faiss_index.with_offsets(self.vectors, off)
        else:
            self.search_vectors = self.vectors
        self.seller_vectors = np.ascontiguousarray(bundle.seller_vectors, dtype=np.float32)
        self._user_pos = pd.Index(bundle.user_ids)
        self._product_pos = pd.Index(bundle.product_ids)
        self._seller_ids = np.asarray(bundle.seller_ids, dtype=object)
        self._product_ids = np.asarray(bundle.product_ids, dtype=object)
        # seller id of a model seller index (None for 0 / unknown)
        sid = np.full(len(self.market.spos_of_sidx), None, dtype=object)
        sid[bundle.seller_idx] = bundle.seller_ids
        self._seller_id_of_idx = sid
        self.exact_below = EXACT_BELOW
        self._flat = isinstance(faiss.downcast_index(bundle.product_index), faiss.IndexFlat)
        self.selective_fraction = SELECTIVE_FRACTION

    # ------------------------------------------------------------------------------------------ users

    def _user_positions(self, user_ids: list[str]) -> np.ndarray:
        return _lookup(self._user_pos, user_ids)

    def product_positions(self, product_ids: list[str]) -> np.ndarray:
        """Positions of product ids (-1 unknown)."""
        return _lookup(self._product_pos, product_ids)

    def user_vectors(
        self, user_ids: list[str], recent_products: list[list[str]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Unit query vectors [U, d] and ``known`` [U] (False: no vector, the caller falls back).

        Known ids use their exported vector; when ``recent_products[i]`` holds known product ids, the
        user tower recomputes row i from the id (0 if unknown), the full history and those products.
        """
        U = len(user_ids)
        pos = self._user_positions(user_ids)
        vec = np.zeros((U, self.dim), np.float32)
        known = pos >= 0
        if known.any():
            vec[known] = self.bundle.user_vectors[pos[known]]
        if recent_products is not None:
            if len(recent_products) != U:
                raise ValueError(f"recent_products has {len(recent_products)} lists for {U} users")
            lens = np.fromiter((len(r or ()) for r in recent_products), np.int64, U)
            flat = [p for r in recent_products for p in (r or ())]
            fpos = self.product_positions(flat)
            row_of = np.repeat(np.arange(U), lens)
            ok = fpos >= 0
            rows = np.unique(row_of[ok])
            if len(rows):
                recent = [[] for _ in range(U)]
                for r, p in zip(row_of[ok], fpos[ok], strict=True):
                    recent[r].append(int(p))
                vec[rows] = self._vectors_with_recent(rows, pos, recent)
                known[rows] = True
        return vec, known

    def _vectors_with_recent(self, rows: np.ndarray, pos: np.ndarray, recent: list[list[int]]) -> np.ndarray:
        b = self.bundle
        L = max(1, int(b.max_history))
        uidx = np.where(pos[rows] >= 0, b.user_idx[np.maximum(pos[rows], 0)], 0)
        if b.model is None:
            # No user tower in this bundle: mean of the recent product vectors (plus the user's own vector).
            out = np.zeros((len(rows), self.dim), np.float32)
            for i, r in enumerate(rows):
                v = self.vectors[recent[r]].mean(0)
                if pos[r] >= 0:
                    v = v + b.user_vectors[pos[r]]
                out[i] = v / max(float(np.linalg.norm(v)), 1e-12)
            return out
        import torch

        hp, hs = self.market.history(uidx, L)
        HP = np.zeros((len(rows), L), np.int64)
        HS = np.zeros((len(rows), L), np.int64)
        rp = self.market.product_idx
        for i, r in enumerate(rows):
            prods = [int(x) for x in hp[i] if x > 0]
            sells = [int(s) for x, s in zip(hp[i], hs[i], strict=True) if x > 0]
            prods += [int(rp[p]) for p in recent[r]]
            sells += [int(self.market.best_seller[p]) for p in recent[r]]
            prods, sells = prods[-L:], sells[-L:]
            HP[i, : len(prods)] = prods
            HS[i, : len(sells)] = sells
        n_users = b.model.shape.n_users
        uidx = np.where(uidx < n_users, uidx, 0)
        with torch.no_grad():
            v = b.model.user_vectors(
                {
                    "user_idx": torch.from_numpy(uidx),
                    "hist_products": torch.from_numpy(HP),
                    "hist_sellers": torch.from_numpy(HS),
                    "hour": torch.full((len(rows),), -1, dtype=torch.long),
                    "dow": torch.full((len(rows),), -1, dtype=torch.long),
                }
            )
        return v.float().numpy()

    # ------------------------------------------------------------------------------------------ products

    def _state(self, f: Filters) -> FilterState:
        if not (f.in_stock or f.categories or f.min_price is not None or f.max_price is not None
                or f.min_seller_rating is not None):
            return self.market.unfiltered
        return self.market.filter_state(
            f.in_stock, tuple(f.categories), f.min_price, f.max_price, f.min_seller_rating
        )

    def _cap(self, f: Filters) -> int:
        return int(f.max_per_seller or self.cfg.max_per_seller or 0)

    def _search(
        self,
        Q: np.ndarray,
        k: int,
        fs: FilterState,
        ex_lens: np.ndarray,
        ex_pos: np.ndarray,
        cap: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k positions per query row under a filter, exclusions and a seller cap."""
        R, P = len(Q), self.P
        if R == 0 or fs.n_allowed == 0 or k <= 0:
            return np.full((R, max(k, 0)), -1, np.int64), np.full((R, max(k, 0)), np.nan, np.float32), np.zeros(R, np.int64)
        rows = np.arange(R, dtype=np.int64)
        ex_keys = np.unique(np.repeat(rows, ex_lens) * P + ex_pos)
        ex_row, ex_p = ex_keys // P, ex_keys % P
        in_allowed = fs.mask[ex_p] if fs.mask is not None else np.ones(len(ex_p), bool)
        ex_cnt = np.bincount(ex_row[in_allowed], minlength=R)
        target = np.minimum(k, fs.n_allowed - ex_cnt)
        m = k + int(ex_cnt.max(initial=0))
        if cap > 0:
            m *= max(1, int(self.cfg.overfetch))
        m = int(min(m, fs.n_allowed))
        seller = fs.best_seller
        if fs.mask is not None:
            A = fs.n_allowed
            if A <= self.exact_below or (A < self.selective_fraction * P and A <= SUBSET_MAX):
                return self._exact(Q, rows, fs, m, target, ex_keys, cap, k)
            if self._flat:  # an exact index anyway: one BLAS pass over all vectors beats FAISS's selector loop
                return self._exact(Q, rows, fs, m, target, ex_keys, cap, k, full=True)
        sel, keep = None, None
        if fs.mask is not None:
            keep = fs.bitmap()
            sel = faiss.IDSelectorBitmap(P, faiss.swig_ptr(keep))
        D, Ix = faiss_index.search(self.bundle.product_index, Q, m, self.bundle.product_settings, sel)
        del keep
        pos, sc, cnt = _select(Ix, D, rows, fs.mask, ex_keys, P, cap, seller, k)
        short = np.flatnonzero(cnt < target)
        if len(short):
            p2, s2, c2 = self._exact(Q[short], short, fs, m, target[short], ex_keys, cap, k)
            pos[short], sc[short], cnt[short] = p2, s2, c2
        return pos, sc, cnt

    def _exact(
        self,
        Q: np.ndarray,
        rows: np.ndarray,
        fs: FilterState,
        m: int,
        target: np.ndarray,
        ex_keys: np.ndarray,
        cap: int,
        k: int,
        full: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact search over the allowed subset, widening the candidate depth until every row is full.

        Few rows: one NumPy product (with ``full``, over all vectors with the disallowed masked out, so
        no copy of the subset is made). Many rows: FAISS's exact BLAS + heap k-NN over the subset.
        """
        R = len(Q)
        if full and fs.mask is not None and R <= SMALL_BATCH and fs.n_allowed > SUBSET_MAX:
            allowed, V, bias = None, self.search_vectors, fs.bias()
        else:
            allowed = fs.allowed()
            V, bias = fs.sub_vectors(self.search_vectors, cache=len(allowed) <= SUBSET_MAX), None
        A = len(V)
        limit = fs.n_allowed
        pos = np.full((R, k), -1, np.int64)
        sc = np.full((R, k), np.nan, np.float32)
        cnt = np.zeros(R, np.int64)
        todo = np.arange(R)
        mm = max(int(m), k, 1)
        while len(todo):
            mm = min(mm, limit)
            chunk = max(1, EXACT_CHUNK // max(A, 1)) if len(todo) <= SMALL_BATCH else BATCH_CHUNK
            for s in range(0, len(todo), chunk):
                t = todo[s : s + chunk]
                if len(t) > SMALL_BATCH and mm < A:
                    Dd, top = faiss.knn(np.ascontiguousarray(Q[t]), V, mm, metric=faiss.METRIC_INNER_PRODUCT)
                    top = top.astype(np.int64)
                else:
                    S = Q[t] @ V.T
                    if bias is not None:
                        S += bias  # -inf on the disallowed positions
                    if mm < A:
                        part = np.argpartition(-S, mm - 1, axis=1)[:, :mm]
                        part.sort(axis=1)  # ties keep position order
                        o = np.argsort(-np.take_along_axis(S, part, 1), axis=1, kind="stable")
                        top = np.take_along_axis(part, o, 1)
                    else:
                        top = np.argsort(-S, axis=1, kind="stable")
                    Dd = np.take_along_axis(S, top, 1)
                C = allowed[top] if allowed is not None else top
                p, sco, c = _select(C, Dd, rows[t], fs.mask if bias is not None else None, ex_keys, self.P, cap,
                                    fs.best_seller, k)
                pos[t], sc[t], cnt[t] = p, sco, c
            if mm >= limit:
                break
            todo = todo[cnt[todo] < target[todo]]
            mm *= 4
        return pos, sc, cnt

    def _popular(self, k: int, fs: FilterState, cap: int) -> tuple[np.ndarray, np.ndarray]:
        """The popular list under a filter and cap: (positions [k] with -1 padding, scores [k])."""
        key = ("popular", k, cap)
        hit = fs.extra.get(key)
        if hit is not None:
            return hit
        order = self.market.pop_order
        if fs.mask is not None:
            order = order[fs.mask[order]]
        depth = len(order) if cap > 0 else min(k, len(order))
        C = order[None, :depth]
        D = self.market.pop_score[C]
        pos, sc, _ = _select(C, D, np.zeros(1, np.int64), None, np.zeros(0, np.int64), self.P, cap, fs.best_seller, k)
        out = (pos[0], sc[0])
        fs.extra[key] = out
        return out

    def topk_products(
        self,
        user_ids: list[str],
        k: int,
        filters: Filters = Filters(),
        recent_products: list[list[str]] | None = None,
        exclude_positions: list[list[int]] | None = None,
        query_vectors: np.ndarray | None = None,
    ) -> TopK:
        """Top-k products for a batch of users as arrays (see :class:`TopK`); the core of every product call.

        Args:
            exclude_positions: extra product positions to exclude per row (e.g. the query product).
            query_vectors: use these [U, d] vectors instead of the users' (rows all known).
        """
        U = len(user_ids)
        k = int(k)
        if query_vectors is None:
            Q, known = self.user_vectors(user_ids, recent_products)
            upos = self._user_positions(user_ids)
        else:
            Q, known = np.ascontiguousarray(query_vectors, np.float32), np.ones(U, bool)
            upos = self._user_positions(user_ids) if any(u is not None for u in user_ids) else np.full(U, -1)
        fs = self._state(filters)
        cap = self._cap(filters)
        positions = np.full((U, k), -1, np.int64)
        scores = np.full((U, k), np.nan, np.float32)
        rows = np.flatnonzero(known)
        if len(rows):
            if filters.exclude_bought:
                uidx = np.where(upos[rows] >= 0, self.bundle.user_idx[np.maximum(upos[rows], 0)], 0)
                ex_lens, ex_pos = self.market.bought(uidx)
            else:
                ex_lens, ex_pos = np.zeros(len(rows), np.int64), np.zeros(0, np.int64)
            if exclude_positions is not None:
                extra = [list(exclude_positions[r]) for r in rows]
                lens2 = np.fromiter((len(e) for e in extra), np.int64, len(rows))
                flat2 = np.fromiter((p for e in extra for p in e), np.int64, int(lens2.sum()))
                row_of = np.concatenate([np.repeat(np.arange(len(rows)), ex_lens), np.repeat(np.arange(len(rows)), lens2)])
                allpos = np.concatenate([ex_pos, flat2])
                o = np.argsort(row_of, kind="stable")
                ex_lens, ex_pos = np.bincount(row_of, minlength=len(rows)), allpos[o]
            Qr = faiss_index.with_offsets(Q[rows], None) if self._offset_dim else Q[rows]
            p, s, _ = self._search(Qr, k, fs, ex_lens, ex_pos, cap)
            positions[rows], scores[rows] = p, s
        fb = ~known
        if fb.any():
            pp, ps = self._popular(k, fs, cap)
            positions[fb], scores[fb] = pp, ps
        ok = positions >= 0
        pc = np.where(ok, positions, 0)
        seller = np.where(ok, fs.best_seller[pc], 0)
        price = np.where(ok, fs.best_price[pc], np.nan).astype(np.float32)
        return TopK(positions, scores, seller, price, fb, ok.sum(1))

    def _candidates(self, t: TopK, row: int) -> list[Candidate]:
        n = int(t.counts[row])
        pos = t.positions[row, :n]
        pids = self._product_ids[pos].tolist()
        sids = self.seller_ids_of_idx(t.seller_idx[row, :n]).tolist()
        scores = t.scores[row, :n].tolist()
        prices = t.price[row, :n].tolist()
        return [
            Candidate(str(p), s, j, None if sid is None else str(sid), None if pr != pr else pr)
            for j, (p, s, sid, pr) in enumerate(zip(pids, scores, sids, prices, strict=True), 1)
        ]

    def product_ids_at(self, positions: np.ndarray) -> np.ndarray:
        """Product ids (object array) of positions (all must be valid, >= 0)."""
        return self._product_ids[np.asarray(positions, np.int64)]

    def product_idx_at(self, positions: np.ndarray) -> np.ndarray:
        """Model product indexes (the towers' / ranker's ids) of positions (all >= 0)."""
        return self.market.product_idx[np.asarray(positions, np.int64)]

    def seller_ids_of_idx(self, seller_idx: np.ndarray) -> np.ndarray:
        """Seller ids (object array, None for 0 / unknown) of model seller indexes."""
        s = np.asarray(seller_idx, np.int64)
        ok = (s > 0) & (s < len(self._seller_id_of_idx))
        return np.where(ok, self._seller_id_of_idx[np.where(ok, s, 0)], None)

    def seller_ids_at(self, positions: np.ndarray) -> np.ndarray:
        """Seller ids of seller positions (rows of the seller export / index)."""
        return self._seller_ids[np.asarray(positions, np.int64)]

    def seller_id(self, seller_idx: int) -> str | None:
        """The id of a model seller index (None for 0 / unknown)."""
        if 0 < seller_idx < len(self._seller_id_of_idx):
            v = self._seller_id_of_idx[seller_idx]
            return None if v is None else str(v)
        return None

    def recommend_products(
        self,
        user_ids: list[str],
        k: int,
        filters: Filters = Filters(),
        recent_products: list[list[str]] | None = None,
    ) -> list[RetrievalResult]:
        """Top-k products per user under ``filters`` (batch them: one FAISS call for all users)."""
        t = self.topk_products(user_ids, k, filters, recent_products)
        return [RetrievalResult(u, self._candidates(t, i), bool(t.fallback[i])) for i, u in enumerate(user_ids)]

    def similar_products(
        self, product_id: str, k: int, filters: Filters = Filters(), user_id: str | None = None
    ) -> list[Candidate]:
        """Products nearest to a product's vector (the product itself excluded; bought items of
        ``user_id`` excluded when given and ``filters.exclude_bought``)."""
        p = self._product_position(product_id)
        t = self.topk_products(
            [user_id], k, filters, exclude_positions=[[p]], query_vectors=self.vectors[p : p + 1]
        )
        return self._candidates(t, 0)

    def _product_position(self, product_id: str) -> int:
        p = int(self.product_positions([product_id])[0])
        if p < 0:
            raise UnknownItemError(f"unknown product_id {product_id!r}")
        return p

    # ------------------------------------------------------------------------------------------ sellers

    def topk_sellers(
        self, user_ids: list[str], k: int, recent_products: list[list[str]] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seller positions [U, k] (-1 pad), scores [U, k], fallback [U]) for a batch of users."""
        U, k = len(user_ids), int(k)
        Q, known = self.user_vectors(user_ids, recent_products)
        pos = np.full((U, k), -1, np.int64)
        sc = np.full((U, k), np.nan, np.float32)
        rows = np.flatnonzero(known)
        kk = min(k, self.S)
        if len(rows) and kk > 0:
            D, Ix = faiss_index.search(self.bundle.seller_index, Q[rows], kk, self.bundle.seller_settings)
            short = (Ix[:, :kk] < 0).any(1)
            if short.any():
                S = Q[rows[short]] @ self.seller_vectors.T
                top = np.argsort(-S, axis=1, kind="stable")[:, :kk]
                Ix[short], D[short] = top, np.take_along_axis(S, top, 1)
            pos[rows, :kk], sc[rows, :kk] = Ix[:, :kk], D[:, :kk]
        fb = ~known
        if fb.any() and kk > 0:
            top = self.market.seller_pop_order[:kk]
            pos[fb, : len(top)] = top
            sc[fb, : len(top)] = self.market.seller_pop_score[top]
        return pos, sc, fb

    def recommend_sellers(
        self, user_ids: list[str], k: int, recent_products: list[list[str]] | None = None
    ) -> list[SellerResult]:
        """Top-k sellers per user (seller tower vectors); unknown users get popular sellers (fallback)."""
        pos, sc, fb = self.topk_sellers(user_ids, k, recent_products)
        out = []
        for i, u in enumerate(user_ids):
            items = [
                SellerCandidate(str(self._seller_ids[p]), float(sc[i, j]), j + 1)
                for j, p in enumerate(pos[i])
                if p >= 0
            ]
            out.append(SellerResult(u, items, bool(fb[i])))
        return out

    def sellers_for_product(self, product_id: str, user_id: str | None = None, k: int = 10) -> list[ProductOffer]:
        """The sellers of a product. Score = product.seller affinity (+ user.seller when the user is known).

        Without a known user the list is in offer-policy order (rank 1 = the buy box); with one it is
        ordered by score (ties in policy order). A product without offers gets the sellers nearest to
        its vector (price/stock unknown).
        """
        p = self._product_position(product_id)
        mk = self.market
        sl = mk.offers_of(p)
        pv = self.vectors[p]
        uvec, known = (None, False)
        if user_id is not None:
            v, kn = self.user_vectors([user_id])
            uvec, known = v[0], bool(kn[0])
        if sl.stop > sl.start:
            sidx = mk.off_seller[sl]
            spos = mk.spos_of(sidx)
            sv = np.where((spos >= 0)[:, None], self.seller_vectors[np.maximum(spos, 0)], 0.0)
            score = sv @ pv + (sv @ uvec if known else 0.0)
            score = np.where(spos >= 0, score, -np.inf)
            order = np.argsort(-score, kind="stable") if known else np.arange(len(sidx))
            out = []
            for rank, j in enumerate(order[:k], 1):
                o = sl.start + int(j)
                stock = int(mk.off_stock[o])
                out.append(
                    ProductOffer(
                        seller_id=self.seller_id(int(sidx[j])) or str(int(sidx[j])),
                        score=float(score[j]) if np.isfinite(score[j]) else float("nan"),
                        rank=rank,
                        price=_opt(float(mk.off_price[o])),
                        stock=None if stock < 0 else stock,
                        shipping_days=_opt(float(mk.off_ship[o])),
                        rating=_opt(float(mk.off_rating[o])),
                        buy_box=int(j) == 0,
                    )
                )
            return out
        q = pv + (uvec if known else 0.0)
        q = (q / max(float(np.linalg.norm(q)), 1e-12)).astype(np.float32)[None, :]
        kk = min(k, self.S)
        if kk <= 0:
            return []
        S = (q @ self.seller_vectors.T)[0]
        top = np.argsort(-S, kind="stable")[:kk]
        return [
            ProductOffer(str(self._seller_ids[s]), float(S[s]), r, None, None, None,
                         _opt(float(mk.seller_rating[self.bundle.seller_idx[s]])), False)
            for r, s in enumerate(top, 1)
        ]
