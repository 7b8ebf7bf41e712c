"""Marketplace data for serving: offers, best offer per product, filter masks, popularity, histories.

:class:`ServingTables` is what a bundle stores (``serving/*.parquet``, keyed by model indexes);
:class:`Marketplace` turns it into arrays over *positions* (row i of the product export / index)
for fast filtering.

Offer policies (``retrieval.offer_policy``) pick each product's best offer ("buy box"). In-stock
offers (stock != 0; unknown stock -1 counts as in stock) always come before out-of-stock ones, then:

* ``lowest_price``: lowest price, then best seller rating, then fastest shipping;
* ``best_rating``: highest seller rating, then lowest price;
* ``fastest_shipping``: fewest shipping days, then lowest price;
* ``best_value``: highest value = 0.6 * (lowest price of the product / offer price)
  + 0.3 * (seller rating / highest seller rating) + 0.1 * 1 / (1 + shipping days); an unknown price or
  shipping time scores 0 in its term, an unknown rating counts as the mean rating.

Unknown values (price, rating, shipping) sort last in every policy; ties go to the lower seller index.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retrieval.common import column, event_codes, link_or_copy, read_table

POLICIES = ("lowest_price", "best_rating", "fastest_shipping", "best_value")
VALUE_WEIGHTS = {"price": 0.6, "rating": 0.3, "shipping": 0.1}
EVENT_WEIGHTS_DEFAULT = {"view": 0.05, "cart": 0.3, "purchase": 1.0}


def _nan_if_negative(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    a[a < 0] = np.nan
    return a


def _list_csr(col: pa.ChunkedArray | pa.Array, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """(lengths [n], flat values) of a list column; nulls are empty lists."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    lengths = np.asarray(pc.list_value_length(col).fill_null(0), dtype=np.int64)
    values = np.asarray(pc.list_flatten(col), dtype=dtype) if len(col) else np.zeros(0, dtype)
    return lengths, values


@dataclass
class ServingTables:
    """Serving-side tables keyed by model indexes (row order free). Missing data = empty arrays.

    Attributes:
        p_idx, p_cats [m, 3], p_price (NaN unknown): products.
        s_idx, s_rating (NaN unknown): sellers.
        o_product, o_seller, o_price (NaN), o_stock (-1 unknown), o_ship (NaN): offers;
        has_offers: False when the data has no offers at all (stock unknown everywhere).
        pop_product, pop_score / spop_seller, spop_score: popularity of products / sellers.
        h_user, h_len, h_products, h_sellers, h_types: full user histories (CSR by row, time-ordered).
    """

    p_idx: np.ndarray
    p_cats: np.ndarray
    p_price: np.ndarray
    s_idx: np.ndarray
    s_rating: np.ndarray
    o_product: np.ndarray
    o_seller: np.ndarray
    o_price: np.ndarray
    o_stock: np.ndarray
    o_ship: np.ndarray
    has_offers: bool
    pop_product: np.ndarray
    pop_score: np.ndarray
    spop_seller: np.ndarray
    spop_score: np.ndarray
    h_user: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    h_len: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    h_products: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    h_sellers: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    h_types: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))

    # ------------------------------------------------------------------------------------------ io

    @staticmethod
    def write_from_prepared(prepared: Path, out: Path, event_weights: dict[str, float] | None = None) -> dict[str, Any]:
        """Write ``out/{products,sellers,offers,popularity,seller_popularity,histories}.parquet``.

        Reads the prepared artifact; absent inputs give empty tables. Returns row counts and sources.
        """
        prepared, out = Path(prepared), Path(out)
        out.mkdir(parents=True, exist_ok=True)
        info: dict[str, Any] = {}
        f = prepared / "features"
        pt = read_table(f / "products.parquet")
        if pt is not None and "product_idx" in pt.column_names:
            cols = {"product_idx": pa.array(column(pt, "product_idx", np.int32), pa.int32())}
            for c in ("cat_l1", "cat_l2", "cat_l3"):
                cols[c] = pa.array(column(pt, c, np.int32) if c in pt.column_names else np.zeros(pt.num_rows, np.int32))
            pcol = "raw_price" if "raw_price" in pt.column_names else ("price" if "price" in pt.column_names else None)
            price = column(pt, pcol, np.float32, -1.0) if pcol else np.full(pt.num_rows, -1.0, np.float32)
            cols["price"] = pa.array(price, pa.float32())
            pq.write_table(pa.table(cols), out / "products.parquet")
            info["products"] = pt.num_rows
        st = read_table(f / "sellers.parquet")
        if st is not None and "seller_idx" in st.column_names:
            rcol = "raw_rating" if "raw_rating" in st.column_names else ("rating" if "rating" in st.column_names else None)
            rating = column(st, rcol, np.float32, np.nan) if rcol else np.full(st.num_rows, np.nan, np.float32)
            pq.write_table(
                pa.table({"seller_idx": pa.array(column(st, "seller_idx", np.int32)), "rating": pa.array(rating)}),
                out / "sellers.parquet",
            )
            info["sellers"] = st.num_rows
        ot = read_table(f / "offers.parquet")
        if ot is not None and ot.num_rows:
            n = ot.num_rows

            def oc(name: str, dtype: Any, fill: Any) -> np.ndarray:
                return column(ot, name, dtype, fill) if name in ot.column_names else np.full(n, fill, dtype)

            pq.write_table(
                pa.table(
                    {
                        "product_idx": pa.array(oc("product_idx", np.int32, 0)),
                        "seller_idx": pa.array(oc("seller_idx", np.int32, 0)),
                        "price": pa.array(oc("price", np.float32, -1.0)),
                        "stock": pa.array(oc("stock", np.int32, -1)),
                        "shipping_days": pa.array(oc("shipping_days", np.float32, -1.0)),
                    }
                ),
                out / "offers.parquet",
            )
            info["offers"] = n
        hist = prepared / "histories" / "full.parquet"
        if hist.exists():
            link_or_copy(hist, out / "histories.parquet")
            info["histories"] = pq.read_metadata(hist).num_rows
        pop, spop, source = _popularity(prepared, pt, ot, event_weights or EVENT_WEIGHTS_DEFAULT)
        info["popularity_source"] = source
        for name, key, (ids, score) in (("popularity", "product_idx", pop), ("seller_popularity", "seller_idx", spop)):
            order = np.lexsort((ids, -score))
            pq.write_table(
                pa.table({key: pa.array(ids[order].astype(np.int32)), "score": pa.array(score[order].astype(np.float32))}),
                out / f"{name}.parquet",
            )
        return info

    @staticmethod
    def read(directory: Path) -> ServingTables:
        """Read what :meth:`write_from_prepared` wrote (missing files give empty tables)."""
        d = Path(directory)
        i64, f32 = np.int64, np.float32
        pt = read_table(d / "products.parquet")
        if pt is not None:
            p_idx = column(pt, "product_idx", i64)
            p_cats = np.stack([column(pt, c, i64) for c in ("cat_l1", "cat_l2", "cat_l3")], 1)
            p_price = _nan_if_negative(column(pt, "price", f32, -1.0))
        else:
            p_idx, p_cats, p_price = np.zeros(0, i64), np.zeros((0, 3), i64), np.zeros(0, f32)
        st = read_table(d / "sellers.parquet")
        s_idx = column(st, "seller_idx", i64) if st is not None else np.zeros(0, i64)
        s_rating = column(st, "rating", f32, np.nan) if st is not None else np.zeros(0, f32)
        ot = read_table(d / "offers.parquet")
        if ot is not None and ot.num_rows:
            offers = (
                column(ot, "product_idx", i64),
                column(ot, "seller_idx", i64),
                _nan_if_negative(column(ot, "price", f32, -1.0)),
                column(ot, "stock", i64, -1),
                _nan_if_negative(column(ot, "shipping_days", f32, -1.0)),
            )
            has = True
        else:
            offers = (np.zeros(0, i64), np.zeros(0, i64), np.zeros(0, f32), np.zeros(0, i64), np.zeros(0, f32))
            has = False
        pops = []
        for name, key in (("popularity", "product_idx"), ("seller_popularity", "seller_idx")):
            t = read_table(d / f"{name}.parquet")
            pops.append((column(t, key, i64), column(t, "score", f32)) if t is not None else (np.zeros(0, i64), np.zeros(0, f32)))
        tables = ServingTables(p_idx, p_cats, p_price, s_idx, s_rating, *offers, has, *pops[0], *pops[1])
        ht = read_table(d / "histories.parquet")
        if ht is not None and ht.num_rows:
            tables.h_user = column(ht, "user_idx", i64)
            tables.h_len, tables.h_products = _list_csr(ht["products"], i64)
            if "sellers" in ht.column_names:
                sl, sv = _list_csr(ht["sellers"], i64)
                tables.h_sellers = sv if np.array_equal(sl, tables.h_len) else np.zeros_like(tables.h_products)
            else:
                tables.h_sellers = np.zeros_like(tables.h_products)
            if "types" in ht.column_names:
                tl, tv = _list_csr(ht["types"], np.int8)
                tables.h_types = tv if np.array_equal(tl, tables.h_len) else np.zeros(len(tables.h_products), np.int8)
            else:
                tables.h_types = np.zeros(len(tables.h_products), np.int8)
        return tables


def _popularity(
    prepared: Path, pt: pa.Table | None, ot: pa.Table | None, weights: dict[str, float]
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], str]:
    """Product and seller popularity: train frequency, else catalog popularity, else histories / examples."""
    from data_pipelines.schema import EVENT_CODE

    w_of_code = np.zeros(3, np.float64)
    for name, code in EVENT_CODE.items():
        w_of_code[code] = float(weights.get(name, 1.0))
    prod: tuple[np.ndarray, np.ndarray] | None = None
    source = "none"
    freq = read_table(prepared / "features" / "product_freq.parquet", ["product_idx", "count"])
    if freq is not None and freq.num_rows:
        prod, source = (column(freq, "product_idx", np.int64), column(freq, "count", np.float64)), "product_freq"
    elif pt is not None and "raw_pop_all" in pt.column_names:
        prod, source = (column(pt, "product_idx", np.int64), column(pt, "raw_pop_all", np.float64)), "raw_pop_all"
    ht = read_table(prepared / "histories" / "full.parquet")
    sell: tuple[np.ndarray, np.ndarray] | None = None
    if ht is not None and ht.num_rows:
        _, hp = _list_csr(ht["products"], np.int64)
        if "types" in ht.column_names:
            _, ty = _list_csr(ht["types"], np.int64)
            w = w_of_code[np.clip(ty, 0, 2)] if len(ty) == len(hp) else np.ones(len(hp))
        else:
            w = np.ones(len(hp))
        if prod is None:
            prod, source = _weighted_counts(hp, w), "histories"
        if "sellers" in ht.column_names:
            _, hs = _list_csr(ht["sellers"], np.int64)
            if len(hs) == len(hp):
                sell = _weighted_counts(hs, w)
    if prod is None or sell is None:
        ex = prepared / "examples" / "train"
        if ex.exists():
            et = pq.read_table(ex, columns=["product_idx", "seller_idx", "weight"])
            w = column(et, "weight", np.float64, 1.0)
            if prod is None:
                prod, source = _weighted_counts(column(et, "product_idx", np.int64), w), "examples/train"
            if sell is None:
                sell = _weighted_counts(column(et, "seller_idx", np.int64), w)
    if sell is None and ot is not None and ot.num_rows:
        s = column(ot, "seller_idx", np.int64)
        sell = _weighted_counts(s, np.ones(len(s)))
    empty = (np.zeros(0, np.int64), np.zeros(0, np.float64))
    prod, sell = prod or empty, sell or empty
    keep_p, keep_s = prod[0] > 0, sell[0] > 0
    return (prod[0][keep_p], prod[1][keep_p]), (sell[0][keep_s], sell[1][keep_s]), source


def _weighted_counts(ids: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(ids) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    keep = ids > 0
    u, inv = np.unique(ids[keep], return_inverse=True)
    return u, np.bincount(inv, weights=w[keep], minlength=len(u))


# ---------------------------------------------------------------------------------------------- positions


@dataclass
class FilterState:
    """The catalog-level part of a filter: which positions are allowed and each one's best offer.

    ``mask`` is None when everything is allowed. ``best_seller`` (model seller index, 0 none) and
    ``best_price`` (NaN unknown) are per position, among the offers that pass the filter.
    """

    mask: np.ndarray | None
    n_allowed: int
    best_seller: np.ndarray
    best_price: np.ndarray
    _allowed: np.ndarray | None = None
    _bitmap: np.ndarray | None = None
    _sub: np.ndarray | None = None
    _bias: np.ndarray | None = None
    extra: dict = field(default_factory=dict)  # per-state caches of the retriever (e.g. popular lists)

    def allowed(self) -> np.ndarray:
        if self._allowed is None:
            self._allowed = np.flatnonzero(self.mask) if self.mask is not None else np.arange(len(self.best_seller))
        return self._allowed

    def bitmap(self) -> np.ndarray:
        """The mask packed as FAISS's ``IDSelectorBitmap`` expects (bit i of byte i // 8, little-endian)."""
        if self._bitmap is None:
            self._bitmap = np.packbits(self.mask, bitorder="little")
        return self._bitmap

    def bias(self) -> np.ndarray:
        """[P] float32: 0 where allowed, -inf elsewhere (added to a score row: far cheaper than a masked store)."""
        if self._bias is None:
            allowed = self.mask if self.mask is not None else np.ones(len(self.best_seller), bool)
            self._bias = np.where(allowed, np.float32(0), np.float32(-np.inf)).astype(np.float32)
        return self._bias

    @property
    def nbytes(self) -> int:
        """Memory held by this state (for the cache's byte budget)."""
        arrays = (self.mask, self._allowed, self._bitmap, self._sub, self._bias)
        own = sum(a.nbytes for a in arrays if a is not None)
        return own + (self.best_seller.nbytes + self.best_price.nbytes if self.mask is not None else 0)

    def sub_vectors(self, vectors: np.ndarray, cache: bool = True) -> np.ndarray:
        """Vectors of the allowed positions (for exact search over the allowed subset); kept when ``cache``."""
        if self.mask is None:
            return vectors
        if self._sub is not None:
            return self._sub
        sub = np.ascontiguousarray(vectors[self.allowed()])
        if cache:
            self._sub = sub
        return sub


class Marketplace:
    """Position-indexed catalog arrays, the offer book under a policy, filters, popularity and histories.

    Args:
        tables: the bundle's serving tables.
        product_idx: [P] model product index of each position (export / index row order).
        seller_idx: [S] model seller index of each seller position.
        categories: (ids, indexes) of ``vocab/categories.parquet`` (category path prefixes).
        policy: one of :data:`POLICIES`.
        bought_events: event-type names that make a product "already bought".
    """

    def __init__(
        self,
        tables: ServingTables,
        product_idx: np.ndarray,
        seller_idx: np.ndarray,
        categories: tuple[np.ndarray, np.ndarray],
        policy: str = "lowest_price",
        bought_events: tuple[str, ...] = ("purchase",),
        cache_size: int = 256,
        cache_bytes: int = 1 << 30,
    ):
        if policy not in POLICIES:
            raise ValueError(f"retrieval.offer_policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.tables = tables
        P = self.P = len(product_idx)
        self.product_idx = np.asarray(product_idx, np.int64)
        n_p = int(max(self.product_idx.max(initial=0), tables.p_idx.max(initial=0), tables.o_product.max(initial=0))) + 1
        self.pos_of_pidx = np.full(n_p, -1, np.int64)
        self.pos_of_pidx[self.product_idx] = np.arange(P)
        self.seller_idx = np.asarray(seller_idx, np.int64)
        n_s = int(max(self.seller_idx.max(initial=0), tables.s_idx.max(initial=0), tables.o_seller.max(initial=0))) + 1
        self.spos_of_sidx = np.full(n_s, -1, np.int64)
        self.spos_of_sidx[self.seller_idx] = np.arange(len(self.seller_idx))
        self.seller_rating = np.full(n_s, np.nan, np.float32)
        self.seller_rating[tables.s_idx] = tables.s_rating
        self.category_index = {str(c): int(i) for c, i in zip(*categories, strict=True)}

        self.cats = np.zeros((P, 3), np.int64)
        self.price = np.full(P, np.nan, np.float32)
        tp = self.pos_of(tables.p_idx)
        ok = tp >= 0
        self.cats[tp[ok]] = tables.p_cats[ok]
        self.price[tp[ok]] = tables.p_price[ok]

        self.has_offers_table = bool(tables.has_offers)
        op = self.pos_of(tables.o_product)
        keep = op >= 0
        op = op[keep]
        o_seller = tables.o_seller[keep]
        o_price = tables.o_price[keep]
        o_stock = tables.o_stock[keep]
        o_ship = tables.o_ship[keep]
        o_rating = self.seller_rating[np.clip(o_seller, 0, n_s - 1)]
        order = self._policy_order(op, o_seller, o_price, o_stock, o_ship, o_rating)
        self.off_pos = op[order]
        self.off_seller = o_seller[order]
        self.off_price = o_price[order]
        self.off_stock = o_stock[order]
        self.off_ship = o_ship[order]
        self.off_rating = o_rating[order]
        counts = np.bincount(self.off_pos, minlength=P)
        self.off_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.has_offer = counts > 0
        # price used by filters / shown: the offer's price, else the product's catalog price
        self.off_price_eff = np.where(np.isnan(self.off_price), self.price[self.off_pos], self.off_price).astype(np.float32)
        self.best_seller = np.zeros(P, np.int64)
        self.best_price = self.price.copy()
        first = self.off_indptr[:-1][self.has_offer]
        self.best_seller[self.has_offer] = self.off_seller[first]
        self.best_price[self.has_offer] = self.off_price_eff[first]

        # popularity (positions, most popular first) and normalised scores
        pp = self.pos_of(tables.pop_product)
        okp = pp >= 0
        self.pop_score = np.zeros(P, np.float32)
        self.pop_score[pp[okp]] = tables.pop_score[okp]
        top = float(self.pop_score.max(initial=0.0)) or 1.0
        self.pop_score /= top
        self.pop_order = np.lexsort((np.arange(P), -self.pop_score))
        sp = self.spos_of(tables.spop_seller)
        oks = sp >= 0
        self.seller_pop_score = np.zeros(len(self.seller_idx), np.float32)
        self.seller_pop_score[sp[oks]] = tables.spop_score[oks]
        top = float(self.seller_pop_score.max(initial=0.0)) or 1.0
        self.seller_pop_score /= top
        self.seller_pop_order = np.lexsort((np.arange(len(self.seller_idx)), -self.seller_pop_score))

        self._build_histories(bought_events)
        self._cache: OrderedDict[tuple, FilterState] = OrderedDict()
        self._cache_size = cache_size
        self._cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self.unfiltered = FilterState(None, P, self.best_seller, self.best_price)

    # ------------------------------------------------------------------------------------------ lookups

    def pos_of(self, pidx: np.ndarray) -> np.ndarray:
        pidx = np.asarray(pidx, np.int64)
        ok = (pidx >= 0) & (pidx < len(self.pos_of_pidx))
        return np.where(ok, self.pos_of_pidx[np.where(ok, pidx, 0)], -1)

    def spos_of(self, sidx: np.ndarray) -> np.ndarray:
        sidx = np.asarray(sidx, np.int64)
        ok = (sidx >= 0) & (sidx < len(self.spos_of_sidx))
        return np.where(ok, self.spos_of_sidx[np.where(ok, sidx, 0)], -1)

    def _policy_order(self, op, seller, price, stock, ship, rating) -> np.ndarray:
        inf = np.float32(np.inf)
        p = np.where(np.isnan(price), inf, price)
        r = np.where(np.isnan(rating), inf, -rating)
        s = np.where(np.isnan(ship), inf, ship)
        oos = (stock == 0).astype(np.int8)
        if self.policy == "lowest_price":
            keys = (seller, s, r, p)
        elif self.policy == "best_rating":
            keys = (seller, s, p, r)
        elif self.policy == "fastest_shipping":
            keys = (seller, r, p, s)
        else:
            keys = (seller, -best_value(op, price, ship, rating))
        return np.lexsort((*keys, oos, op))

    def _build_histories(self, bought_events: tuple[str, ...]) -> None:
        t = self.tables
        n_u = int(t.h_user.max(initial=0)) + 1
        lengths = np.zeros(n_u, np.int64)
        # rows may come in any user order: reorder the flat arrays by user
        row_start = np.concatenate([[0], np.cumsum(t.h_len)]).astype(np.int64)
        order = np.argsort(t.h_user, kind="stable")
        lengths[t.h_user] = t.h_len
        self.hist_indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        take = _gather_ranges(row_start[:-1][order], t.h_len[order])
        self.hist_products = t.h_products[take]
        self.hist_sellers = t.h_sellers[take] if len(t.h_sellers) == len(t.h_products) else np.zeros(len(take), np.int64)
        types = t.h_types[take] if len(t.h_types) == len(t.h_products) else np.zeros(len(take), np.int8)
        # already-bought positions per user (unique)
        codes = event_codes(bought_events)
        user_of = np.repeat(np.arange(n_u), lengths)
        pos = self.pos_of(self.hist_products)
        m = np.isin(types.astype(np.int64), codes) & (pos >= 0)
        key = np.unique(user_of[m] * max(self.P, 1) + pos[m])
        bu = key // max(self.P, 1)
        self.bought_pos = (key % max(self.P, 1)).astype(np.int64)
        self.bought_indptr = np.concatenate([[0], np.cumsum(np.bincount(bu, minlength=n_u))]).astype(np.int64)

    def bought(self, user_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lengths [B], concatenated bought positions) for model user indexes (0 / unknown: none)."""
        return _csr_rows(self.bought_indptr, self.bought_pos, user_idx)

    def history(self, user_idx: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Left-aligned 0-padded last ``width`` products and sellers (model indexes) per user."""
        lens, prods = _csr_rows(self.hist_indptr, self.hist_products, user_idx)
        _, sells = _csr_rows(self.hist_indptr, self.hist_sellers, user_idx)
        return _pad_last(lens, prods, width), _pad_last(lens, sells, width)

    def offers_of(self, pos: int) -> slice:
        """Slice into the ``off_*`` arrays: the product's offers in policy order (best first)."""
        return slice(int(self.off_indptr[pos]), int(self.off_indptr[pos + 1]))

    # ------------------------------------------------------------------------------------------ filters

    def filter_state(
        self,
        in_stock: bool = False,
        categories: tuple[str, ...] = (),
        min_price: float | None = None,
        max_price: float | None = None,
        min_seller_rating: float | None = None,
    ) -> FilterState:
        """Allowed positions and best offers for a catalog filter.

        States are cached by value (least recently used first out; at most ``cache_size`` states and
        ``cache_bytes`` bytes, counting the vectors cached for exact search).
        """
        key = (bool(in_stock), tuple(categories), min_price, max_price, min_seller_rating)
        st = self._cache.get(key)
        if st is not None:
            try:
                self._cache.move_to_end(key)
            except KeyError:  # evicted meanwhile by another thread
                pass
            return st
        st = self._compute_state(*key)
        with self._lock:
            self._cache[key] = st
            total = sum(v.nbytes for v in self._cache.values())
            while len(self._cache) > 1 and (len(self._cache) > self._cache_size or total > self._cache_bytes):
                _, old = self._cache.popitem(last=False)
                total -= old.nbytes
        return st

    def _compute_state(self, in_stock, categories, min_price, max_price, min_rating) -> FilterState:
        mask: np.ndarray | None = None
        if categories:
            ids = np.asarray([self.category_index[c] for c in categories if c in self.category_index], np.int64)
            mask = np.isin(self.cats, ids[ids > 0]).any(1) if len(ids) else np.zeros(self.P, bool)
        stock_filter = in_stock and self.has_offers_table
        price_filter = min_price is not None or max_price is not None
        best_seller, best_price = self.best_seller, self.best_price
        if stock_filter or price_filter or min_rating is not None:
            ok = np.ones(len(self.off_pos), bool)
            lo = -np.inf if min_price is None else float(min_price)
            hi = np.inf if max_price is None else float(max_price)
            if stock_filter:
                ok &= self.off_stock != 0
            if min_rating is not None:
                ok &= self.off_rating >= float(min_rating)
            if price_filter:
                ok &= (self.off_price_eff >= lo) & (self.off_price_eff <= hi)
            prod_ok = np.zeros(self.P, bool)
            prod_ok[self.off_pos[ok]] = True
            # products without any offer: only a price filter can admit them (by catalog price)
            no_offer_ok = ~self.has_offer
            if stock_filter or min_rating is not None:
                no_offer_ok = np.zeros(self.P, bool)
            elif price_filter:
                no_offer_ok = no_offer_ok & (self.price >= lo) & (self.price <= hi)
            m = prod_ok | no_offer_ok
            mask = m if mask is None else mask & m
            okidx = np.flatnonzero(ok)
            upos, first = np.unique(self.off_pos[okidx], return_index=True)
            best_seller, best_price = self.best_seller.copy(), self.best_price.copy()
            best_seller[upos] = self.off_seller[okidx[first]]
            best_price[upos] = self.off_price_eff[okidx[first]]
        n = int(mask.sum()) if mask is not None else self.P
        if mask is not None and n == self.P:
            mask = None
        return FilterState(mask, n, best_seller, best_price)


def best_value(op: np.ndarray, price: np.ndarray, ship: np.ndarray, rating: np.ndarray) -> np.ndarray:
    """The ``best_value`` blend per offer (higher is better); see the module docstring."""
    w = VALUE_WEIGHTS
    minp = np.full(int(op.max(initial=0)) + 1, np.inf, np.float64)
    known = ~np.isnan(price) & (price > 0)
    np.minimum.at(minp, op[known], price[known].astype(np.float64))
    price_term = np.where(known, minp[op] / np.where(known, price, 1.0), 0.0)
    mean_r = float(np.nanmean(rating)) if np.any(~np.isnan(rating)) else 0.0
    r = np.where(np.isnan(rating), mean_r, rating)
    top_r = float(np.max(r, initial=0.0)) or 1.0
    ship_term = np.where(np.isnan(ship), 0.0, 1.0 / (1.0 + np.maximum(ship, 0.0)))
    return w["price"] * price_term + w["rating"] * r / top_r + w["shipping"] * ship_term


# ---------------------------------------------------------------------------------------------- CSR utils


def _gather_ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + l)`` for every (s, l)."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offs = np.cumsum(lens) - lens
    return np.repeat(starts - offs, lens) + np.arange(total)


def _csr_rows(indptr: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(rows, np.int64)
    ok = (rows > 0) & (rows < len(indptr) - 1)
    r = np.where(ok, rows, 0)
    starts = indptr[r]
    lens = np.where(ok, indptr[r + 1] - starts, 0)
    return lens, values[_gather_ranges(starts, lens)]


def _pad_last(lens: np.ndarray, values: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((len(lens), width), np.int64)
    if width == 0 or len(values) == 0:
        return out
    keep = np.minimum(lens, width)
    starts = np.cumsum(lens) - lens + (lens - keep)
    row = np.repeat(np.arange(len(lens)), keep)
    col = np.arange(int(keep.sum())) - np.repeat(np.cumsum(keep) - keep, keep)
    out[row, col] = values[np.repeat(starts, keep) + col]
    return out
