"""Contract of the Retriever with hand-made vectors whose exact answers are known, on Flat, HNSW and IVF."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest

from recsys.config import load_config
from retrieval import faiss_index
from retrieval.bundle import Bundle
from retrieval.faiss_index import SearchSettings
from retrieval.marketplace import ServingTables
from retrieval.retriever import Filters, Retriever

FACTORIES = ["Flat", "HNSW32", "IVF8,Flat"]
P, D, S = 400, 8, 10


def _tables(rng: np.random.Generator, n_products: int, bought: dict[int, list[int]]) -> ServingTables:
    pidx = np.arange(1, n_products + 1)
    cats = np.stack([pidx % 4 + 1, 5 + pidx % 3, np.zeros(n_products, np.int64)], 1)
    price = (5.0 + (pidx % 50) * 2.0).astype(np.float32)
    o_p, o_s, o_price, o_stock = [], [], [], []
    for p in pidx:
        if p % 10 == 0:
            continue  # every 10th product has no offer at all
        for s in rng.choice(np.arange(1, S + 1), int(rng.integers(1, 4)), replace=False):
            o_p.append(p)
            o_s.append(int(s))
            o_price.append(np.nan if rng.random() < 0.1 else float(price[p - 1] * rng.uniform(0.7, 1.3)))
            o_stock.append(int(rng.choice([0, -1, 5])))
    users = sorted(bought)
    h_len = np.array([len(bought[u]) for u in users], np.int64)
    flat = np.array([p for u in users for p in bought[u]], np.int64)
    return ServingTables(
        p_idx=pidx, p_cats=cats, p_price=price,
        s_idx=np.arange(1, S + 1), s_rating=np.linspace(0.1, 1.0, S).astype(np.float32),
        o_product=np.array(o_p, np.int64), o_seller=np.array(o_s, np.int64), o_price=np.array(o_price, np.float32),
        o_stock=np.array(o_stock, np.int64), o_ship=np.ones(len(o_p), np.float32), has_offers=True,
        pop_product=pidx, pop_score=(n_products - pidx).astype(np.float32) + 1,  # p1 most popular
        spop_seller=np.arange(1, S + 1), spop_score=np.arange(S, 0, -1).astype(np.float32),
        h_user=np.array(users, np.int64), h_len=h_len, h_products=flat, h_sellers=np.zeros_like(flat),
        h_types=np.full(len(flat), 2, np.int8),
    )


def _bundle(products: np.ndarray, users: np.ndarray, tables: ServingTables, factory: str,
            offsets: np.ndarray | None = None) -> Bundle:
    cfg = load_config(None, ["retrieval.recall_k=20"]).retrieval
    if offsets is None:
        index, info = faiss_index.build_tuned(products, users, factory, cfg)
    else:  # the popularity prior: the product index holds the offsets as one more dimension
        index, info = faiss_index.build_tuned(faiss_index.with_offsets(products, offsets),
                                              faiss_index.with_offsets(users, None), factory, cfg)
    rng = np.random.default_rng(3)
    sv = rng.normal(size=(S, products.shape[1])).astype(np.float32)
    sv /= np.linalg.norm(sv, axis=1, keepdims=True)
    cats = (np.array(["a", "b", "c", "d", "a > x", "a > y", "b > z"], dtype=object), np.arange(1, 8))
    return Bundle(
        version=f"test-{factory}", dim=products.shape[1],
        product_ids=np.array([f"p{i}" for i in range(1, len(products) + 1)], dtype=object),
        product_idx=np.arange(1, len(products) + 1), product_vectors=products, product_index=index,
        product_settings=SearchSettings.from_dict(info["settings"]),
        seller_ids=np.array([f"s{i}" for i in range(1, S + 1)], dtype=object), seller_idx=np.arange(1, S + 1),
        seller_vectors=sv, seller_index=faiss_index.build_index(sv, "Flat"),
        user_ids=np.array([f"u{i}" for i in range(1, len(users) + 1)], dtype=object),
        user_idx=np.arange(1, len(users) + 1), user_vectors=users, tables=tables, categories=cats,
        product_offsets=offsets,
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- oracle


_ALLOWED: dict[tuple, list[tuple[int, int]]] = {}


def _allowed(b: Bundle, f: Filters, cat_ids: dict[str, int]) -> list[tuple[int, int]]:
    """(position, best-offer seller) of every product passing the catalog filters (lowest_price policy)."""
    key = (id(b.tables), f.in_stock, f.categories, f.min_price, f.max_price, f.min_seller_rating)
    if key in _ALLOWED:
        return _ALLOWED[key]
    t = b.tables
    offers: dict[int, list[tuple]] = {}
    rating = dict(zip(t.s_idx.tolist(), t.s_rating.tolist(), strict=True))
    for p, s, pr, st in zip(t.o_product, t.o_seller, t.o_price, t.o_stock, strict=True):
        eff = float(t.p_price[p - 1]) if math.isnan(pr) else float(pr)
        offers.setdefault(int(p), []).append((int(st == 0), math.inf if math.isnan(pr) else float(pr), -rating[int(s)],
                                              int(s), eff, int(st), rating[int(s)]))
    want_cats = {cat_ids[c] for c in f.categories if c in cat_ids}
    lo = -math.inf if f.min_price is None else f.min_price
    hi = math.inf if f.max_price is None else f.max_price
    out = []
    for pos in range(len(b.product_idx)):
        p = pos + 1
        if f.categories and not (set(t.p_cats[pos].tolist()) & want_cats):
            continue
        offer_filter = f.in_stock or f.min_seller_rating is not None or f.min_price is not None or f.max_price is not None
        best = sorted(offers.get(p, []))
        seller = best[0][3] if best else 0
        if offer_filter:
            # comparisons in float32, like the stored values
            ok = [o for o in best if (not f.in_stock or o[5] != 0)
                  and (f.min_seller_rating is None or np.float32(o[6]) >= np.float32(f.min_seller_rating))
                  and np.float32(lo) <= np.float32(o[4]) <= np.float32(hi)]
            if best and not ok:
                continue
            if not best and (f.in_stock or f.min_seller_rating is not None or not (lo <= t.p_price[pos] <= hi)):
                continue
            seller = ok[0][3] if ok else 0
        out.append((pos, seller))
    _ALLOWED[key] = out
    return out


def _oracle(b: Bundle, uvec: np.ndarray, user_idx: int, k: int, f: Filters, cat_ids: dict[str, int]) -> list[str]:
    """Brute-force answer following the documented semantics (lowest_price policy)."""
    t = b.tables
    bought = set()
    if f.exclude_bought and user_idx in t.h_user.tolist():
        i = t.h_user.tolist().index(user_idx)
        start = int(t.h_len[:i].sum())
        bought = set(t.h_products[start : start + t.h_len[i]].tolist())
    scores = b.product_vectors @ uvec + (0.0 if b.product_offsets is None else b.product_offsets)
    allowed = sorted((x for x in _allowed(b, f, cat_ids) if x[0] + 1 not in bought), key=lambda x: (-scores[x[0]], x[0]))
    out, per = [], {}
    for pos, s in allowed:
        if f.max_per_seller and s > 0:
            if per.get(s, 0) >= f.max_per_seller:
                continue
            per[s] = per.get(s, 0) + 1
        out.append(f"p{pos + 1}")
        if len(out) == k:
            break
    return out


CASES = [
    Filters(exclude_bought=False),
    Filters(),
    Filters(in_stock=True),
    Filters(categories=("b",)),
    Filters(categories=("a > x", "c")),
    Filters(min_price=20, max_price=60),
    Filters(min_seller_rating=0.7),
    Filters(max_per_seller=2),
    Filters(in_stock=True, categories=("a",), max_price=50, min_seller_rating=0.5, max_per_seller=1),
    Filters(categories=("nonexistent",)),
]


@pytest.fixture(scope="module")
def random_world():
    rng = np.random.default_rng(0)
    products = _unit(rng.normal(size=(P, D)))
    users = _unit(rng.normal(size=(6, D)))
    bought = {1: [int(x) for x in np.argsort(-(products @ users[0]))[:15] + 1], 2: [5, 6, 7]}
    return products, users, _tables(rng, P, bought)


@pytest.mark.parametrize("offsets", [False, True], ids=["cosine", "with-offsets"])
@pytest.mark.parametrize("subset_search", [True, False], ids=["exact-subset", "index-path"])
@pytest.mark.parametrize("factory", FACTORIES)
def test_matches_brute_force_under_every_filter(random_world, factory, subset_search, offsets) -> None:
    """Every filter, both search paths, every index type; with offsets the score is cos + offset
    (the popularity prior), large enough to reorder the lists."""
    products, users, tables = random_world
    off = -0.5 * np.random.default_rng(5).random(len(products)).astype(np.float32) if offsets else None
    b = _bundle(products, users, tables, factory, off)
    r = Retriever(b, load_config(None).retrieval)
    if not subset_search:  # filtered searches go through the index (FAISS selector, or masked BLAS for Flat)
        r.exact_below, r.selective_fraction = 0, 0.0
    cat_ids = {str(c): int(i) for c, i in zip(*b.categories, strict=True)}
    uids = [f"u{i}" for i in range(1, 7)]
    for f in CASES:
        for k in (10, 50):
            got = r.recommend_products(uids, k, f)
            for i, res in enumerate(got):
                want = _oracle(b, users[i], i + 1, k, f, cat_ids)
                ids = [c.product_id for c in res.candidates]
                assert ids == want, (factory, f, k, i)
                assert not res.fallback
                assert [c.rank for c in res.candidates] == list(range(1, len(ids) + 1))
                pos = np.array([int(x[1:]) - 1 for x in ids], np.int64)
                want_scores = products[pos] @ users[i] + (0.0 if off is None else off[pos])
                assert np.allclose([c.score for c in res.candidates], want_scores, atol=1e-5)


@pytest.mark.parametrize("factory", FACTORIES)
def test_known_answer_on_a_fan_of_vectors(factory) -> None:
    """Product i sits at angle 0.003*i from the user: the exact top-k is p1..pk with score cos(0.003*i)."""
    n = 300
    ang = 0.003 * np.arange(n)
    products = np.zeros((n, 4), np.float32)
    products[:, 0], products[:, 1] = np.cos(ang), np.sin(ang)
    users = np.array([[1, 0, 0, 0], [0, 0, 1, 0]], np.float32)
    rng = np.random.default_rng(1)
    tables = _tables(rng, n, {1: [1, 3]})
    b = _bundle(products, users, tables, factory)
    r = Retriever(b, load_config(None).retrieval)
    res = r.recommend_products(["u1"], 5, Filters(exclude_bought=False))[0]
    assert [c.product_id for c in res.candidates] == ["p1", "p2", "p3", "p4", "p5"]
    assert np.allclose([c.score for c in res.candidates], np.cos(ang[:5]), atol=1e-6)
    res = r.recommend_products(["u1"], 5)[0]  # p1 and p3 bought
    assert [c.product_id for c in res.candidates] == ["p2", "p4", "p5", "p6", "p7"]
    # only products 1..20 of category "b" (p % 4 == 1 -> cat 2 "b"): p5, p9, p13, p17 ...
    res = r.recommend_products(["u1"], 3, Filters(categories=("b",)))[0]
    assert [c.product_id for c in res.candidates] == ["p5", "p9", "p13"]
    # asking for more than exist returns all of them, never a -1 placeholder
    res = r.recommend_products(["u1"], 200, Filters(categories=("b",), exclude_bought=False))[0]
    assert len(res.candidates) == n // 4 and all(c.product_id.startswith("p") for c in res.candidates)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_large_batches_take_the_same_answers(random_world, factory) -> None:
    """More than SMALL_BATCH rows: exact search runs through FAISS k-NN over the allowed subset."""
    products, _, tables = random_world
    rng = np.random.default_rng(5)
    users = _unit(rng.normal(size=(40, D)))
    b = _bundle(products, users, tables, factory)
    r = Retriever(b, load_config(None).retrieval)
    r.exact_below = 10_000 if factory == "HNSW32" else 0
    cat_ids = {str(c): int(i) for c, i in zip(*b.categories, strict=True)}
    for f in (Filters(in_stock=True, max_price=70), Filters(categories=("c",), max_per_seller=1)):
        got = r.recommend_products([f"u{i}" for i in range(1, 41)], 30, f)
        for i, res in enumerate(got):
            assert [c.product_id for c in res.candidates] == _oracle(b, users[i], i + 1, 30, f, cat_ids), (f, i)


def test_exactly_k_when_ann_misses_under_a_selective_filter(random_world) -> None:
    """IVF with nprobe=1 and a filter that leaves few items per list: short rows fall back to exact search."""
    products, users, tables = random_world
    b = _bundle(products, users, tables, "IVF8,Flat")
    b.product_settings = SearchSettings(nprobe=1)
    r = Retriever(b, load_config(None).retrieval)
    r.exact_below, r.selective_fraction = 0, 0.0  # force the FAISS selector path
    cat_ids = {str(c): int(i) for c, i in zip(*b.categories, strict=True)}
    f = Filters(categories=("a > x",), min_seller_rating=0.4)
    for i, res in enumerate(r.recommend_products([f"u{j}" for j in range(1, 7)], 20, f)):
        want = _oracle(b, users[i], i + 1, 20, f, cat_ids)
        assert len(want) == 20
        assert [c.product_id for c in res.candidates] == want


def test_unknown_users_fall_back_to_filtered_popularity(random_world) -> None:
    products, users, tables = random_world
    r = Retriever(_bundle(products, users, tables, "Flat"), load_config(None).retrieval)
    res = r.recommend_products(["nobody", "u1"], 5)
    assert res[0].fallback and not res[1].fallback
    assert [c.product_id for c in res[0].candidates] == ["p1", "p2", "p3", "p4", "p5"]
    res = r.recommend_products(["nobody"], 3, Filters(categories=("b",)))[0]
    assert [c.product_id for c in res.candidates] == ["p1", "p5", "p9"]  # p % 4 == 1
    assert res.candidates[0].score == pytest.approx(1.0)
    vec, known = r.user_vectors(["nobody", "u2"])
    assert known.tolist() == [False, True] and np.allclose(vec[1], users[1])
    # an anonymous user with recent products is not a fallback (no user tower: mean of the products)
    res = r.recommend_products(["nobody"], 3, recent_products=[["p10", "p11"]])[0]
    assert not res.fallback and len(res.candidates) == 3
    sel = r.recommend_sellers(["nobody", "u1"], 3)
    assert sel[0].fallback and [s.seller_id for s in sel[0].sellers] == ["s1", "s2", "s3"]
    assert not sel[1].fallback and len(sel[1].sellers) == 3


def test_offer_policy_and_product_sellers(random_world) -> None:
    products, users, tables = random_world
    b = _bundle(products, users, tables, "Flat")
    cheap = Retriever(b, load_config(None, ["retrieval.offer_policy=lowest_price"]).retrieval)
    rated = Retriever(b, load_config(None, ["retrieval.offer_policy=best_rating"]).retrieval)
    value = Retriever(b, load_config(None, ["retrieval.offer_policy=best_value"]).retrieval)
    multi = [p for p in range(1, P + 1) if (tables.o_product == p).sum() >= 2][:20]
    for p in multi:
        m = tables.o_product == p
        stock_ok = tables.o_stock[m] != 0
        prices = np.where(np.isnan(tables.o_price[m]), np.inf, tables.o_price[m])
        rating = tables.s_rating[tables.o_seller[m] - 1]
        offers = cheap.sellers_for_product(f"p{p}", None, 5)
        assert offers[0].buy_box and len(offers) == m.sum()
        key = sorted(zip(~stock_ok, prices, -rating, strict=True))[0]
        assert (offers[0].price or np.inf) == pytest.approx(key[1])
        top_rated = rated.sellers_for_product(f"p{p}", None, 5)[0]
        assert top_rated.rating == pytest.approx(max(r for r, ok in zip(rating, stock_ok, strict=True) if ok == stock_ok.any()))
        assert value.sellers_for_product(f"p{p}", None, 5)[0].buy_box
    personal = cheap.sellers_for_product(f"p{multi[0]}", "u1", 5)
    assert [o.score for o in personal] == sorted((o.score for o in personal), reverse=True)
    no_offer = cheap.sellers_for_product("p10", None, 3)  # every 10th product has no offer
    assert len(no_offer) == 3 and all(o.price is None for o in no_offer)
    sim = cheap.similar_products("p7", 5, Filters(exclude_bought=False))
    assert "p7" not in [c.product_id for c in sim] and len(sim) == 5
    order = np.argsort(-(products @ products[6]), kind="stable")
    assert [c.product_id for c in sim] == [f"p{i + 1}" for i in order if i != 6][:5]


def test_automatic_ann_index_on_a_clustered_catalog_under_every_filter() -> None:
    """The automatic choice above FLAT_BELOW (IVF + 4-bit fast-scan PQ + exact refine) on a clustered catalog.

    Under every filter and both search paths: exactly min(k, allowed) products, each passing the filters
    and not bought, distinct, with exact scores in descending order, and recall against the brute-force
    answer at least the build's recall floor.
    """
    rng = np.random.default_rng(7)
    n, d, n_users = 12_000, 32, 12
    centers = _unit(rng.normal(size=(150, d)))
    products = _unit(centers[rng.integers(0, 150, n)] + rng.normal(scale=0.6 / np.sqrt(d), size=(n, d)))
    users = _unit(centers[rng.integers(0, 150, n_users)] + rng.normal(scale=0.6 / np.sqrt(d), size=(n_users, d)))
    bought = {1: [int(x) for x in np.argsort(-(products @ users[0]))[:30] + 1], 2: [5, 6, 7]}
    tables = _tables(rng, n, bought)
    factory = faiss_index.choose_factory(faiss_index.FLAT_BELOW, d)
    assert "PQ" in factory and "RFlat" in factory
    b = _bundle(products, users, tables, factory)
    assert "IVF" in type(faiss.downcast_index(b.product_index.base_index)).__name__
    cat_ids = {str(c): int(i) for c, i in zip(*b.categories, strict=True)}
    uids = [f"u{i}" for i in range(1, n_users + 1)]
    for subset_search in (True, False):
        r = Retriever(b, load_config(None).retrieval)
        if not subset_search:
            r.exact_below, r.selective_fraction = 0, 0.0
        for f in CASES:
            allowed = {pos for pos, _ in _allowed(b, f, cat_ids)}
            hits = wanted = 0
            for i, res in enumerate(r.recommend_products(uids, 50, f)):
                want = _oracle(b, users[i], i + 1, 50, f, cat_ids)
                ids = [c.product_id for c in res.candidates]
                pos = np.array([int(x[1:]) - 1 for x in ids], np.int64)
                assert len(ids) == len(want) and len(set(ids)) == len(ids), (f, i, subset_search)
                assert set(pos.tolist()) <= allowed, (f, i)
                if f.exclude_bought:
                    assert not set((pos + 1).tolist()) & set(bought.get(i + 1, [])), (f, i)
                scores = np.array([c.score for c in res.candidates])
                assert np.allclose(scores, products[pos] @ users[i], atol=1e-5)
                assert np.all(np.diff(scores) <= 1e-6)
                hits += len(set(ids) & set(want))
                wanted += len(want)
            assert hits >= 0.95 * wanted, (f, subset_search, hits, wanted)
