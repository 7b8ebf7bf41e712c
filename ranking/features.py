"""Ranker input features shared by training data (``ranking.data``) and serving (``ranking.scorer``).

One implementation for both sides, so training and serving cannot drift apart:

* **Offer features** (one row per (product, seller) offer, plus a seller-0 row for every product
  without offers) are computed by :func:`offer_feature_table` from the *serving tables* of
  :class:`retrieval.marketplace.ServingTables` (the same representation a bundle loads): training
  builds those tables from the prepared artifact with ``ServingTables.write_from_prepared``.
* **User features** (:func:`user_features`) come from the user's last ``history_window`` events.
* **Candidate features** (:func:`candidate_features`): the retrieval score and rank, and whether the
  row was retrieved at all (training adds the positives retrieval missed; serving never has them).
* History-match and two-tower similarity features are computed inside the model
  (:class:`ranking.model.RankerModel`) from indexes, so they have one implementation too.

Everything here is NumPy only (no torch, no Spark).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Offer features, in model input order.
OFFER_FEATURES = (
    "log_price_vs_category",  # log(offer price / median price of the product's category), clipped to [-3, 3]
    "log_price_vs_min",  # log(offer price / the product's lowest offer price), clipped to [0, 3]
    "is_lowest_price",  # 1 when this offer has the product's lowest known price
    "price_unknown",
    "shipping_days",  # days / 7, clipped to [0, 4]
    "shipping_unknown",
    "log_stock",  # log1p(stock) / log1p(1000)
    "stock_unknown",
    "out_of_stock",
    "no_offer",  # the product has no offers (seller 0 row)
)
USER_FEATURES = ("log_history_len", "purchase_share", "cart_share")
CANDIDATE_FEATURES = ("retrieval_score", "retrieval_rank", "not_retrieved")
# Features the model derives from indexes (documented here, computed in ranking.model).
MODEL_FEATURES = (
    "sim_user_product", "sim_user_seller", "sim_history_product", "sim_history_seller", "sim_product_seller",
    "history_product_count", "history_seller_share", "history_category_share", "history_leaf_share",
)
PURCHASE, CART = 2, 1


def history_window(max_history: int) -> int:
    """How many recent events the user features look at (what ``histories/*.parquet`` keeps)."""
    return 4 * int(max_history)


def category_key(cats: np.ndarray) -> np.ndarray:
    """The deepest known category index of each product ([n, 3] levels 1-3 → [n]; 0 unknown).

    Category indexes are path prefixes in one vocabulary, so indexes of different levels never collide.
    """
    cats = np.asarray(cats, np.int64).reshape(-1, 3)
    key = cats[:, 0].copy()
    for lvl in (1, 2):
        key = np.where(cats[:, lvl] > 0, cats[:, lvl], key)
    return key


@dataclass(frozen=True)
class OfferTable:
    """Offer features keyed by (product_idx, seller_idx), sorted by key for ``searchsorted`` lookups.

    Attributes:
        product_idx, seller_idx: [M] int64 (seller 0 = the product has no offer).
        features: [M, len(OFFER_FEATURES)] float32.
        price, stock, shipping_days: [M] raw values (NaN / -1 unknown), shown by the API.
        indptr: [n_products + 1] CSR over ``product_idx`` (rows of one product are contiguous).
    """

    product_idx: np.ndarray
    seller_idx: np.ndarray
    features: np.ndarray
    price: np.ndarray
    stock: np.ndarray
    shipping_days: np.ndarray
    indptr: np.ndarray
    n_sellers: int

    def keys(self) -> np.ndarray:
        return self.product_idx * (self.n_sellers + 1) + self.seller_idx

    def rows_of_product(self, product_idx: int) -> slice:
        p = int(product_idx)
        if p <= 0 or p >= len(self.indptr) - 1:
            return slice(0, 0)
        return slice(int(self.indptr[p]), int(self.indptr[p + 1]))

    def lookup(self, product_idx: np.ndarray, seller_idx: np.ndarray) -> np.ndarray:
        """Row of each (product, seller) pair, -1 when the pair is not an offer."""
        p = np.asarray(product_idx, np.int64)
        s = np.asarray(seller_idx, np.int64)
        ok = (s >= 0) & (s <= self.n_sellers)
        q = p * (self.n_sellers + 1) + np.where(ok, s, 0)
        keys = self.keys()
        pos = np.clip(np.searchsorted(keys, q), 0, max(len(keys) - 1, 0))
        hit = ok & (len(keys) > 0) & (keys[pos] == q) if len(keys) else np.zeros(len(q), bool)
        return np.where(hit, pos, -1)

    def features_of(self, product_idx: np.ndarray, seller_idx: np.ndarray) -> np.ndarray:
        """Features of pairs; a pair that is not an offer gets the "unknown offer" vector."""
        rows = self.lookup(product_idx, seller_idx)
        out = np.tile(unknown_offer_vector(), (len(rows), 1))
        ok = rows >= 0
        out[ok] = self.features[rows[ok]]
        return out


def unknown_offer_vector() -> np.ndarray:
    v = np.zeros(len(OFFER_FEATURES), np.float32)
    for name in ("price_unknown", "shipping_unknown", "stock_unknown"):
        v[OFFER_FEATURES.index(name)] = 1.0
    return v


def offer_feature_table(
    p_idx: np.ndarray,
    p_cats: np.ndarray,
    p_price: np.ndarray,
    o_product: np.ndarray,
    o_seller: np.ndarray,
    o_price: np.ndarray,
    o_stock: np.ndarray,
    o_ship: np.ndarray,
    n_products: int,
    n_sellers: int,
) -> OfferTable:
    """Offer features from serving-table arrays (NaN price / shipping and -1 stock mean unknown).

    Args:
        p_idx, p_cats [m, 3], p_price: products (catalog price, NaN unknown).
        o_product, o_seller, o_price, o_stock, o_ship: offers.
        n_products, n_sellers: table sizes (index 0 included); out-of-range indexes are dropped.

    Returns:
        An :class:`OfferTable` with one row per offer and a seller-0 row for every product index
        1..n_products-1 that has no offer.
    """
    n_products, n_sellers = int(n_products), int(n_sellers)
    cats = np.zeros((n_products, 3), np.int64)
    ref_price = np.full(n_products, np.nan, np.float64)
    p_idx = np.asarray(p_idx, np.int64)
    okp = (p_idx > 0) & (p_idx < n_products)
    cats[p_idx[okp]] = np.asarray(p_cats, np.int64).reshape(-1, 3)[okp]
    ref_price[p_idx[okp]] = np.asarray(p_price, np.float64)[okp]

    o_product = np.asarray(o_product, np.int64)
    o_seller = np.asarray(o_seller, np.int64)
    keep = (o_product > 0) & (o_product < n_products) & (o_seller > 0) & (o_seller < n_sellers)
    op, os_ = o_product[keep], o_seller[keep]
    price = np.asarray(o_price, np.float64)[keep]
    price = np.where(price > 0, price, np.nan)
    stock = np.asarray(o_stock, np.int64)[keep]
    ship = np.asarray(o_ship, np.float64)[keep]
    ship = np.where(ship >= 0, ship, np.nan)
    # de-duplicate (product, seller): keep the first
    key = op * (n_sellers + 1) + os_
    _, first = np.unique(key, return_index=True)
    op, os_, price, stock, ship = op[first], os_[first], price[first], stock[first], ship[first]

    # reference price of a product: catalog price, else its median offer price
    has_offer = np.zeros(n_products, bool)
    has_offer[op] = True
    if len(op):
        order = np.lexsort((price, op))
        for p_, grp in _groups(op[order]):
            vals = price[order][grp]
            vals = vals[~np.isnan(vals)]
            if np.isnan(ref_price[p_]) and len(vals):
                ref_price[p_] = float(np.median(vals))
    ref_price = np.where(ref_price > 0, ref_price, np.nan)
    # median reference price per category (deepest known level), global median for unknown categories
    ck = category_key(cats)
    known = ~np.isnan(ref_price)
    known[0] = False
    global_med = float(np.median(ref_price[known])) if known.any() else np.nan
    cat_med = np.full(int(ck.max(initial=0)) + 1, global_med, np.float64)
    if known.any():
        order = np.argsort(ck[known], kind="stable")
        kk, vv = ck[known][order], ref_price[known][order]
        for c, grp in _groups(kk):
            if c > 0:
                cat_med[c] = float(np.median(vv[grp]))
    med_of_product = cat_med[ck]

    # minimum known offer price per product
    minp = np.full(n_products, np.inf, np.float64)
    kp = ~np.isnan(price)
    np.minimum.at(minp, op[kp], price[kp])

    no_offer = np.flatnonzero(~has_offer)
    no_offer = no_offer[no_offer > 0]
    all_p = np.concatenate([op, no_offer])
    all_s = np.concatenate([os_, np.zeros(len(no_offer), np.int64)])
    all_price = np.concatenate([price, ref_price[no_offer]])
    all_stock = np.concatenate([stock, np.full(len(no_offer), -1, np.int64)])
    all_ship = np.concatenate([ship, np.full(len(no_offer), np.nan)])
    is_offer = np.concatenate([np.ones(len(op), bool), np.zeros(len(no_offer), bool)])

    f = np.zeros((len(all_p), len(OFFER_FEATURES)), np.float32)
    col = {n: i for i, n in enumerate(OFFER_FEATURES)}
    pk = ~np.isnan(all_price)
    med = med_of_product[all_p]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_cat = np.where(pk & (med > 0), np.log(all_price / med), 0.0)
        mp = minp[all_p]
        rel_min = np.where(pk & np.isfinite(mp) & is_offer, np.log(all_price / mp), 0.0)
    f[:, col["log_price_vs_category"]] = np.clip(np.nan_to_num(rel_cat), -3, 3)
    f[:, col["log_price_vs_min"]] = np.clip(np.nan_to_num(rel_min), 0, 3)
    f[:, col["is_lowest_price"]] = (is_offer & pk & (all_price <= mp * (1 + 1e-6))).astype(np.float32)
    f[:, col["price_unknown"]] = (~pk).astype(np.float32)
    sk = ~np.isnan(all_ship)
    f[:, col["shipping_days"]] = np.where(sk, np.clip(np.nan_to_num(all_ship) / 7.0, 0, 4), 0.0)
    f[:, col["shipping_unknown"]] = (~sk).astype(np.float32)
    stk = all_stock >= 0
    f[:, col["log_stock"]] = np.where(stk, np.log1p(np.maximum(all_stock, 0)) / np.log1p(1000.0), 0.0)
    f[:, col["stock_unknown"]] = (~stk).astype(np.float32)
    f[:, col["out_of_stock"]] = (all_stock == 0).astype(np.float32)
    f[:, col["no_offer"]] = (~is_offer).astype(np.float32)

    order = np.lexsort((all_s, all_p))
    counts = np.bincount(all_p[order], minlength=n_products)
    return OfferTable(
        product_idx=all_p[order],
        seller_idx=all_s[order],
        features=f[order],
        price=all_price[order].astype(np.float32),
        stock=all_stock[order],
        shipping_days=all_ship[order].astype(np.float32),
        indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        n_sellers=n_sellers,
    )


def offer_table_from_serving(tables, n_products: int, n_sellers: int) -> OfferTable:
    """:func:`offer_feature_table` from a :class:`retrieval.marketplace.ServingTables`."""
    t = tables
    return offer_feature_table(t.p_idx, t.p_cats, t.p_price, t.o_product, t.o_seller, t.o_price, t.o_stock,
                               t.o_ship, n_products, n_sellers)


def _groups(sorted_keys: np.ndarray):
    """(key, slice) for each run of equal keys in a sorted array."""
    if len(sorted_keys) == 0:
        return
    starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
    ends = np.concatenate([starts[1:], [len(sorted_keys)]])
    for s, e in zip(starts, ends, strict=True):
        yield int(sorted_keys[s]), slice(int(s), int(e))


def user_features(n_events: np.ndarray, n_purchases: np.ndarray, n_carts: np.ndarray, window: int) -> np.ndarray:
    """[U, len(USER_FEATURES)] from counts over the user's last ``window`` events."""
    n = np.asarray(n_events, np.float64)
    d = np.maximum(n, 1.0)
    return np.stack(
        [np.log1p(n) / np.log1p(max(window, 1)), np.asarray(n_purchases) / d, np.asarray(n_carts) / d], 1
    ).astype(np.float32)


def user_features_from_types(types: np.ndarray, window: int) -> np.ndarray:
    """User features of one user from their event codes (oldest first); uses the last ``window``."""
    t = np.asarray(types, np.int64)[-window:] if window > 0 else np.zeros(0, np.int64)
    return user_features(np.array([len(t)]), np.array([(t == PURCHASE).sum()]), np.array([(t == CART).sum()]), window)[0]


def candidate_features(score: np.ndarray, rank: np.ndarray, n_candidates: int, added: np.ndarray | None = None,
                       list_id: np.ndarray | None = None) -> np.ndarray:
    """[n, 3]: the retrieval score, log1p(rank) / log1p(n_candidates) (rank 1 = best), not-retrieved flag.

    Ranks are clipped to ``n_candidates`` (the list length the ranker was trained on). Rows in
    ``added`` are positives that retrieval missed, added to training lists: their true score and
    rank (below everything retrieved, a value serving never produces) would teach "a low retrieval
    score is good", so they get their list's mean retrieved score and rank feature instead and the
    flag set to 1 (mean imputation plus a missing indicator). Serving passes no ``added``.

    Args:
        score: [n] retrieval scores.
        rank: [n] retrieval ranks (1-based).
        n_candidates: N.
        added: [n] bool, rows not retrieved, or None (none).
        list_id: [n] int, the list of each row (needed with ``added``).
    Returns:
        [n, len(CANDIDATE_FEATURES)] float32.
    """
    r = np.clip(np.asarray(rank, np.float64), 1, max(n_candidates, 1))
    sc = np.asarray(score, np.float64).copy()
    rf = np.log1p(r) / np.log1p(max(n_candidates, 1))
    flag = np.zeros(len(sc))
    if added is not None and np.any(added):
        added = np.asarray(added, bool)
        lid = np.asarray(list_id, np.int64)
        n_lists = int(lid.max()) + 1
        kept = ~added
        cnt = np.bincount(lid[kept], minlength=n_lists)
        den = np.maximum(cnt, 1)
        mean_sc = np.bincount(lid[kept], sc[kept], minlength=n_lists) / den
        mean_rf = np.bincount(lid[kept], rf[kept], minlength=n_lists) / den
        sc[added] = mean_sc[lid[added]]
        rf[added] = mean_rf[lid[added]]
        flag[added] = 1.0
    return np.stack([sc, rf, flag], 1).astype(np.float32)
