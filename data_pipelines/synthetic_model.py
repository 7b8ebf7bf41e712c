"""The numerics of the synthetic marketplace: world building, chunked event simulation, oracle.

The generative model is documented in :mod:`data_pipelines.synthetic`; this module implements it
with numpy only (no per-event or per-session Python loops). Everything here works on integer
indexes; string IDs and Parquet I/O live in :mod:`data_pipelines.synthetic`.

Random streams: the world (catalog, sellers, offers, users and their latent factors) is drawn from
``default_rng([seed, 0, part])``; the events of user chunk ``c`` from ``default_rng([seed, 1, c])``.
A chunk depends only on the world and its own stream, so the output does not depend on how many
chunks are processed at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np

DAY = 86400
HOUR = 3600

L2_NAMES = {  # sub-category names per top-level category
    "electronics": "audio phones computers cameras tv gaming wearables accessories".split(),
    "home": "kitchen furniture bedding lighting decor storage bath appliances".split(),
    "fashion": "womens mens shoes bags jewelry watches kids sportswear".split(),
    "grocery": "snacks beverages coffee-tea pantry breakfast sweets organic baby-food".split(),
    "beauty": "skincare makeup haircare fragrance nails bath-body grooming tools".split(),
    "sports": "fitness cycling running outdoor team-sports swimming yoga camping".split(),
    "toys": "building dolls puzzles board-games outdoor-play plush educational vehicles".split(),
    "pets": "dog-food cat-food pet-toys pet-health aquarium birds pet-beds pet-grooming".split(),
    "books": "fiction non-fiction kids-books comics textbooks cooking travel self-help".split(),
    "health": "vitamins first-aid personal-care devices supplements oral-care eye-care wellness".split(),
    "automotive": "car-care tools parts car-electronics tires interior exterior motorcycle".split(),
    "garden": "plants garden-tools outdoor-furniture watering seeds garden-decor grills pest-control".split(),
}
L1_NAMES = tuple(L2_NAMES)
L3_MODIFIERS = ("basic", "pro", "mini", "classic", "smart", "eco", "deluxe", "compact")
CONSUMABLE_L1 = ("grocery", "beauty", "pets", "health")
REGIONS = ("north", "south", "east", "west", "central")

# Fixed coefficients of the generative model. They are written to ``_latent/params.json`` so the
# oracle scores a generated folder with the coefficients it was generated with.
COEF = {
    "brand_weight": 1.0,  # scale of the user-brand affinity in the product fit
    "style_weight": 0.8,  # scale of the user-product style affinity
    "cart_bias": -2.7,
    "cart_fit": 0.8,
    "cart_rating": 0.6,
    "cart_price_z": -0.3,  # expensive-for-the-category products are carted less
    "buy_bias": -0.8,
    "buy_fit": 0.5,
    "buy_rating": 0.8,
    "buy_shipping": -0.1,  # per shipping day above 3
    "region_bonus": 0.4,  # seller utility bonus when the seller is in the user's region
    "session_gap_s": 75.0,  # mean seconds between interactions of a session
    "rows_per_interaction": 1.35,  # calibration: event rows per sampled interaction (for n_events)
}


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and knobs of one synthetic marketplace. ``n_events`` is a target (about +-10%)."""

    n_users: int
    n_products: int
    n_sellers: int
    n_events: int
    n_l1: int = 8  # top-level categories (at most 12)
    n_l2: int = 4  # sub-categories per top-level category (at most 8)
    n_l3: int = 3  # leaf categories per sub-category (at most 8)
    n_brands: int = 150
    days: int = 180
    start: str = "2024-01-01"  # UTC date the period starts
    chunk_users: int = 20000  # users simulated (and written as one part file) at a time
    block_events: int = 65536  # interactions scored at a time inside a chunk (memory bound)
    max_offers: int = 6  # offers per product: 1..max_offers
    interests: int = 6  # category interest slots per user
    candidates: int = 12  # popularity candidates per interaction before the taste re-weighting
    latent_dim: int = 8  # dimension of the brand and of the style factors
    zipf_a: float = 0.9  # product popularity ~ rank^-zipf_a
    cold_start_fraction: float = 0.10  # products created inside the period
    cold_start_window: float = 0.30  # ... in its last 30%
    late_seller_fraction: float = 0.08  # sellers that join inside the period
    new_user_fraction: float = 0.30  # users who sign up inside the period
    explore: float = 0.10  # share of category choices drawn from global category popularity
    wander: float = 0.20  # share of a session's interactions that leave the session's category
    drift: float = 2.0  # sd of the change of an interest's logit over the whole period
    session_mean: float = 3.5  # interactions per session
    activity_sigma: float = 1.0  # log-normal spread of user activity (light vs heavy users)
    out_of_stock_fraction: float = 0.15  # non-primary offers that sell out during the period
    repeat_rounds: int = 6  # at most this many re-orders per consumable purchase

    def __post_init__(self) -> None:
        checks = {
            "n_users >= 1": self.n_users >= 1,
            "n_sellers >= n_l1": self.n_sellers >= self.n_l1,
            "1 <= n_l1 <= 12": 1 <= self.n_l1 <= len(L1_NAMES),
            "1 <= n_l2 <= 8": 1 <= self.n_l2 <= 8,
            "1 <= n_l3 <= 8": 1 <= self.n_l3 <= len(L3_MODIFIERS),
            "n_products >= number of leaf categories": self.n_products >= self.n_leaves,
            "n_brands >= n_l1": self.n_brands >= self.n_l1,
            "days >= 14": self.days >= 14,
            "n_events >= n_users": self.n_events >= self.n_users,
            "chunk_users >= 1": self.chunk_users >= 1,
            "max_offers >= 1": self.max_offers >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid SyntheticSpec: {', '.join(bad)}")

    @property
    def n_leaves(self) -> int:
        return self.n_l1 * self.n_l2 * self.n_l3

    @property
    def start_ts(self) -> int:
        d = datetime.strptime(self.start, "%Y-%m-%d").replace(tzinfo=timezone.utc)
        return int(d.timestamp())

    @property
    def end_ts(self) -> int:
        return self.start_ts + self.days * DAY

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _zipf_weights(n: int, a: float, rng: np.random.Generator) -> np.ndarray:
    """Weights ``rank^-a`` assigned to a random permutation of ``n`` items."""
    rank = rng.permutation(n)
    return (rank + 1.0) ** -a


def _row_categorical(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One draw per row from row-wise (unnormalised) probabilities, by inverse CDF."""
    cdf = np.cumsum(probs, axis=1)
    k = (cdf < (u * cdf[:, -1])[:, None]).sum(axis=1)
    return np.minimum(k, probs.shape[1] - 1)


def _gumbel(rng: np.random.Generator, shape) -> np.ndarray:
    return -np.log(-np.log(rng.random(shape, dtype=np.float32) * 0.9999999 + 5e-8))


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _names(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct pronounceable brand names."""
    cons = list("bcdfghklmnprstvz")
    vows = list("aeiou")
    ends = ["", "x", "n", "r", "s", "ix", "on", "a", "o", "ly"]
    out: list[str] = []
    seen: set[str] = set()
    nsyl = rng.integers(2, 4, size=n)
    parts_c = rng.integers(0, len(cons), size=(n, 3))
    parts_v = rng.integers(0, len(vows), size=(n, 3))
    end = rng.integers(0, len(ends), size=n)
    for i in range(n):
        s = "".join(cons[parts_c[i, j]] + vows[parts_v[i, j]] for j in range(nsyl[i])) + ends[end[i]]
        s = s.capitalize()
        if s in seen:
            s = f"{s}{i}"
        seen.add(s)
        out.append(s)
    return out


# ----------------------------------------------------------------------------------------------
# The world: catalog, sellers, offers, users (with their latent factors)
# ----------------------------------------------------------------------------------------------


def build_world(spec: SyntheticSpec, seed: int) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """All static entities. Returns (arrays, names): arrays is what ``_latent/`` stores."""

    def rng(part: int) -> np.random.Generator:
        return np.random.default_rng([seed, 0, part])

    start, T = spec.start_ts, spec.days * DAY
    end = start + T
    n1, n2, n3, L = spec.n_l1, spec.n_l2, spec.n_l3, spec.n_leaves
    d = spec.latent_dim
    w: dict[str, np.ndarray] = {}

    # --- categories ------------------------------------------------------------------------
    r = rng(1)
    w1 = r.dirichlet(np.full(n1, 2.0))
    w2 = r.dirichlet(np.full(n2, 1.5), size=n1)
    w3 = r.dirichlet(np.full(n3, 1.5), size=(n1, n2))
    leaf_l1 = np.repeat(np.arange(n1), n2 * n3)
    leaf_l2 = np.tile(np.repeat(np.arange(n2), n3), n1)
    leaf_l3 = np.tile(np.arange(n3), n1 * n2)
    leaf_pop = w1[leaf_l1] * w2[leaf_l1, leaf_l2] * w3[leaf_l1, leaf_l2, leaf_l3]
    l1_price = r.normal(0.0, 0.6, n1)
    leaf_median_price = np.exp(math.log(35.0) + l1_price[leaf_l1] + r.normal(0.0, 0.5, L))
    l1_names = L1_NAMES[:n1]
    leaf_consumable = np.isin(np.array(l1_names)[leaf_l1], CONSUMABLE_L1)
    leaf_cycle_days = r.uniform(14.0, 60.0, L)
    leaf_names = [
        f"{l1_names[a]} > {L2_NAMES[l1_names[a]][b]} > {L2_NAMES[l1_names[a]][b]} {L3_MODIFIERS[c]}"
        for a, b, c in zip(leaf_l1, leaf_l2, leaf_l3, strict=True)
    ]
    w.update(
        w1=w1,
        w2=w2,
        w3=w3,
        leaf_pop=leaf_pop / leaf_pop.sum(),
        leaf_median_price=leaf_median_price,
        leaf_consumable=leaf_consumable,
        leaf_cycle_days=leaf_cycle_days,
    )

    # --- brands ----------------------------------------------------------------------------
    r = rng(2)
    B = spec.n_brands
    brand_l1 = r.integers(0, n1, B)
    brand_l1[:n1] = np.arange(n1)  # every top-level category has a brand
    brand_size = _zipf_weights(B, 0.8, r)
    brand_prestige = r.normal(0.0, 0.35, B)
    brand_vec = r.normal(0.0, 1.0, (B, d))
    brand_names = _names(B, r)
    w.update(brand_l1=brand_l1, brand_prestige=brand_prestige, brand_vec=brand_vec.astype(np.float32))

    # --- products (internal order: by leaf, then by popularity descending) -----------------
    r = rng(3)
    P = spec.n_products
    size_w = 0.5 * leaf_pop / leaf_pop.sum() + 0.5 / L
    sizes = 1 + r.multinomial(P - L, size_w)
    prod_leaf = np.repeat(np.arange(L), sizes)
    pop = _zipf_weights(P, spec.zipf_a, r)
    order = np.lexsort((-pop, prod_leaf))
    pop = pop[order]
    leaf_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    prod_brand = np.empty(P, np.int64)
    prod_l1 = leaf_l1[prod_leaf]
    for a in range(n1):
        idx = np.flatnonzero(prod_l1 == a)
        cands = np.flatnonzero(brand_l1 == a)
        p = brand_size[cands] / brand_size[cands].sum()
        prod_brand[idx] = cands[r.choice(len(cands), size=len(idx), p=p)]
    prod_z = brand_prestige[prod_brand] + r.normal(0.0, 0.3, P)
    raw = leaf_median_price[prod_leaf] * np.exp(prod_z)
    prod_price = np.where(raw >= 5.0, np.floor(raw) + 0.99, np.round(raw, 2))
    prod_z = np.log(prod_price / leaf_median_price[prod_leaf])
    style = r.normal(0.0, 1.0, (P, d))
    prod_vec = np.concatenate(
        [
            brand_vec[prod_brand] * (COEF["brand_weight"] / math.sqrt(d)),
            style * (COEF["style_weight"] / math.sqrt(d)),
        ],
        axis=1,
    ).astype(np.float32)
    cold = r.random(P) < spec.cold_start_fraction
    cold[leaf_start[:-1]] = False  # the most popular product of each leaf is always available
    win = spec.cold_start_window
    prod_created = np.where(
        cold,
        start + T * (1.0 - win + win * r.random(P)),
        start - r.random(P) * 730 * DAY,
    ).astype(np.int64)
    prod_cdf = np.cumsum(pop)
    model_no = r.integers(100, 1000, P)
    letters = r.integers(0, 26, P)
    titles = [
        f"{brand_names[b]} {leaf_names[lf].rsplit(' > ', 1)[1]} {chr(65 + c)}{m}"
        for b, lf, c, m in zip(prod_brand, prod_leaf, letters, model_no, strict=True)
    ]
    # product ids are a random permutation of the internal order (ids carry no category signal)
    prod_id_num = r.permutation(P)
    w.update(
        prod_leaf=prod_leaf,
        prod_brand=prod_brand,
        prod_pop=pop,
        prod_cdf=prod_cdf,
        leaf_start=leaf_start,
        prod_z=prod_z,
        prod_price=prod_price,
        prod_vec=prod_vec,
        prod_created=prod_created,
        prod_id_num=prod_id_num,
    )

    # --- sellers ---------------------------------------------------------------------------
    r = rng(4)
    S = spec.n_sellers
    seller_size = _zipf_weights(S, 1.0, r)
    rating = np.round(np.clip(5.0 - r.gamma(2.0, 0.3, S), 1.0, 5.0), 1)
    seller_region = r.integers(0, len(REGIONS), S)
    late = r.random(S) < spec.late_seller_fraction
    seller_created = np.where(
        late, start + T * (0.4 + 0.5 * r.random(S)), start - r.random(S) * 3 * 365 * DAY
    ).astype(np.int64)
    price_level = r.normal(0.0, 0.04, S) + 0.03 * (rating - 4.3)
    ship_base = np.clip(1 + r.poisson(2.0, S), 1, 10)
    home = np.zeros((S, n1), bool)
    home[np.arange(S), r.permutation(S) % n1] = True
    extra = r.random(S) < 0.4
    home[np.flatnonzero(extra), r.integers(0, n1, S)[extra]] = True
    w.update(
        seller_rating=rating,
        seller_region=seller_region,
        seller_created=seller_created,
        seller_price_level=price_level,
        seller_ship_base=ship_base,
    )

    # --- offers (primary offer first; it is from an early seller and never sells out) ------
    r = rng(5)
    pop_pct = np.empty(P)
    pop_pct[np.argsort(-pop)] = np.arange(P) / max(P - 1, 1)
    n_off = 1 + r.binomial(spec.max_offers - 1, 0.08 + 0.35 * (1.0 - pop_pct))
    off_prod_parts, off_seller_parts, off_first_parts = [], [], []
    early = seller_created < start
    for a in range(n1):
        prods = np.flatnonzero(prod_l1 == a)
        elig = np.flatnonzero(home[:, a])
        elig_early = elig[early[elig]]
        if len(elig_early) == 0:
            elig_early = np.flatnonzero(early) if early.any() else np.arange(S)
        k = n_off[prods]
        op = np.repeat(prods, k)
        first = np.zeros(len(op), bool)
        first[np.cumsum(k) - k] = True
        sel = np.empty(len(op), np.int64)
        pe = seller_size[elig_early] / seller_size[elig_early].sum()
        sel[first] = elig_early[r.choice(len(elig_early), size=int(first.sum()), p=pe)]
        pa_ = seller_size[elig] / seller_size[elig].sum()
        sel[~first] = elig[r.choice(len(elig), size=int((~first).sum()), p=pa_)]
        off_prod_parts.append(op)
        off_seller_parts.append(sel)
        off_first_parts.append(first)
    op = np.concatenate(off_prod_parts)
    osel = np.concatenate(off_seller_parts)
    ofirst = np.concatenate(off_first_parts)
    # drop duplicate (product, seller) pairs, keeping the primary one, then order primary first
    key = op * S + osel
    pri = np.lexsort((~ofirst, key))
    keep = np.ones(len(key), bool)
    ks = key[pri]
    keep[1:] = ks[1:] != ks[:-1]
    sel_idx = pri[keep]
    op, osel, ofirst = op[sel_idx], osel[sel_idx], ofirst[sel_idx]
    o = np.lexsort((osel, ~ofirst, op))
    op, osel, ofirst = op[o], osel[o], ofirst[o]
    counts = np.bincount(op, minlength=P)
    off_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n_o = len(op)
    off_price = prod_price[op] * np.exp(price_level[osel] + r.normal(0.0, 0.05, n_o))
    off_price = np.round(np.maximum(off_price, 0.5), 2)
    off_logrel = np.log(off_price / prod_price[op])
    soldout = (~ofirst) & (r.random(n_o) < spec.out_of_stock_fraction)
    off_stock = np.where(soldout, 0, np.where(ofirst, 5 + r.geometric(1 / 60, n_o), r.geometric(1 / 25, n_o)))
    off_soldout_at = np.where(soldout, start + T * (0.3 + 0.7 * r.random(n_o)), 2**62).astype(np.int64)
    off_ship = np.clip(ship_base[osel] + r.integers(0, 2, n_o), 1, 14)
    w.update(
        off_prod=op,
        off_seller=osel,
        off_start=off_start,
        off_price=off_price,
        off_logrel=off_logrel,
        off_stock=off_stock.astype(np.int64),
        off_ship=off_ship,
        off_soldout_at=off_soldout_at,
    )

    # --- users -----------------------------------------------------------------------------
    r = rng(6)
    U, K = spec.n_users, spec.interests
    user_region = r.integers(0, len(REGIONS), U)
    new = r.random(U) < spec.new_user_fraction
    signup = np.where(new, start + r.random(U) * (T - 7 * DAY), start - r.random(U) * 3 * 365 * DAY).astype(
        np.int64
    )
    active_start = np.maximum(signup, start)
    rate = r.lognormal(0.0, spec.activity_sigma, U)
    # interests: 1-3 top-level categories; per top-level interest a primary sub-category
    n_int_l1 = 1 + r.binomial(2, 0.35, U)
    l1_choice = _row_categorical(np.broadcast_to(w1, (U * 3, n1)), r.random(U * 3)).reshape(U, 3)
    slot_l1 = l1_choice[np.arange(U)[:, None], np.arange(K)[None, :] % n_int_l1[:, None]]
    prim_l2 = _row_categorical(w2[l1_choice.ravel()], r.random(U * 3)).reshape(U, 3)
    slot_prim = prim_l2[np.arange(U)[:, None], np.arange(K)[None, :] % n_int_l1[:, None]]
    rand_l2 = _row_categorical(w2[slot_l1.ravel()], r.random(U * K)).reshape(U, K)
    slot_l2 = np.where(r.random((U, K)) < 0.6, slot_prim, rand_l2)
    slot_l3 = _row_categorical(w3[slot_l1.ravel(), slot_l2.ravel()], r.random(U * K)).reshape(U, K)
    user_int_leaf = (slot_l1 * (n2 * n3) + slot_l2 * n3 + slot_l3).astype(np.int32)
    user_int_a = r.normal(0.0, 1.0, (U, K))
    user_int_g = r.normal(0.0, spec.drift, (U, K))
    user_vec = r.normal(0.0, 1.0, (U, 2 * d)).astype(np.float32)
    user_pp = r.normal(0.0, 0.35, U)
    user_lam = r.lognormal(math.log(0.8), 0.4, U)
    user_alpha = r.lognormal(math.log(10.0), 0.5, U)
    user_rho = r.lognormal(math.log(0.8), 0.5, U)
    user_gamma = r.lognormal(math.log(0.5), 0.5, U)
    user_repeat = 0.8 * r.beta(2.0, 2.0, U)
    window = (end - active_start) / T
    target = spec.n_events / COEF["rows_per_interaction"]
    scale = max(target - U, 0.0) / max(float((rate * window).sum()), 1e-9)
    user_n = (1 + r.poisson(rate * window * scale)).astype(np.int64)
    w.update(
        user_region=user_region,
        user_signup=signup,
        user_active_start=active_start,
        user_n=user_n,
        user_int_leaf=user_int_leaf,
        user_int_a=user_int_a,
        user_int_g=user_int_g,
        user_vec=user_vec,
        user_pp=user_pp,
        user_lam=user_lam,
        user_alpha=user_alpha,
        user_rho=user_rho,
        user_gamma=user_gamma,
        user_repeat=user_repeat,
    )

    # --- traffic intensity per hour: daily curve x weekday x slow growth -------------------
    H = spec.days * 24
    hours = np.arange(H)
    abs_hour = start // HOUR + hours
    hod = abs_hour % 24
    dow = (abs_hour // 24 + 3) % 7  # 1970-01-01 was a Thursday; 0 = Monday
    daily = 0.25 + 1.3 * np.exp(-(((hod - 20) / 3.5) ** 2)) + 0.6 * np.exp(-(((hod - 12) / 3.0) ** 2))
    weekly = np.where(dow >= 5, 1.3, np.where(dow == 0, 1.1, 1.0))
    trend = 1.0 + 0.3 * hours / H
    inten = daily * weekly * trend
    w["hour_cdf"] = np.concatenate([[0.0], np.cumsum(inten) / inten.sum()])

    names = {"l1": list(l1_names), "leaf": leaf_names, "brand": brand_names, "title": titles}
    return w, names


# ----------------------------------------------------------------------------------------------
# Taste and fit (shared by the simulator and the oracle)
# ----------------------------------------------------------------------------------------------


def drift_phase(t, start: int, T: int):
    """Position in the period in [-0.5, 0.5]; the interest logits are ``a + phase * g``."""
    return (np.asarray(t, dtype=np.float64) - start) / T - 0.5


def leaf_probs(w: dict, users: np.ndarray, t, spec_explore: float, start: int, T: int) -> np.ndarray:
    """P(leaf | user, t) for each user (rows) over all leaves: the oracle's category taste."""
    s = drift_phase(t, start, T)
    s = np.broadcast_to(s, users.shape)
    pi = _softmax_rows(w["user_int_a"][users] + s[:, None] * w["user_int_g"][users])
    q = np.tile(spec_explore * w["leaf_pop"], (len(users), 1))
    rows = np.arange(len(users))
    for k in range(pi.shape[1]):
        np.add.at(q, (rows, w["user_int_leaf"][users, k]), (1.0 - spec_explore) * pi[:, k])
    return q


def _fit(w: dict, users: np.ndarray, prods: np.ndarray) -> np.ndarray:
    """Taste fit of each user (n,) with each of its candidate products (n, m)."""
    uv = w["user_vec"][users]  # (n, 2d)
    pv = w["prod_vec"][prods]  # (n, m, 2d)
    f = np.matmul(pv, uv[:, :, None])[..., 0]
    dz = w["prod_z"][prods] - w["user_pp"][users][:, None]
    return f - w["user_lam"][users][:, None] * dz * dz


# ----------------------------------------------------------------------------------------------
# Event simulation for one chunk of users
# ----------------------------------------------------------------------------------------------


def _sample_times(w: dict, lo_ts: np.ndarray, start: int, end: int, rng: np.random.Generator) -> np.ndarray:
    """Times in [lo_ts, end) following the hourly traffic intensity (inverse CDF)."""
    C = w["hour_cdf"]
    grid = np.arange(len(C), dtype=np.float64)
    c_lo = np.interp((lo_ts - start) / HOUR, grid, C)
    target = c_lo + rng.random(len(lo_ts)) * (1.0 - c_lo)
    t = start + HOUR * np.interp(target, C, grid)
    return np.clip(t.astype(np.int64), lo_ts, end - 1)


def _sample_leaves(w, users, t, spec: SyntheticSpec, rng) -> np.ndarray:
    start, T = spec.start_ts, spec.days * DAY
    s = drift_phase(t, start, T)
    logits = w["user_int_a"][users] + s[:, None] * w["user_int_g"][users]
    k = _row_categorical(np.exp(logits - logits.max(axis=1, keepdims=True)), rng.random(len(users)))
    leaf = w["user_int_leaf"][users, k].astype(np.int64)
    explore = rng.random(len(users)) < spec.explore
    lc = np.cumsum(w["leaf_pop"])
    ex = np.minimum(np.searchsorted(lc, rng.random(int(explore.sum())) * lc[-1], side="right"), len(lc) - 1)
    leaf[explore] = ex
    return leaf


def _choose_products(w, users, leaves, t, spec: SyntheticSpec, rng) -> tuple[np.ndarray, np.ndarray]:
    """Sample-then-reweight: popularity candidates within the leaf, pick by exp(fit) (Gumbel-max)."""
    n, M = len(users), spec.candidates
    prod = np.empty(n, np.int64)
    fit = np.empty(n, np.float64)
    cdf, ls = w["prod_cdf"], w["leaf_start"]
    created = w["prod_created"]
    for b0 in range(0, n, spec.block_events):
        sl = slice(b0, min(n, b0 + spec.block_events))
        u, lf, tt = users[sl], leaves[sl], t[sl]
        first, last = ls[lf], ls[lf + 1] - 1
        c_lo = cdf[first] - w["prod_pop"][first]
        c_hi = cdf[last]
        target = c_lo[:, None] + rng.random((len(u), M)) * (c_hi - c_lo)[:, None]
        cand = np.searchsorted(cdf, target, side="right")
        cand = np.clip(cand, first[:, None], last[:, None])
        f = _fit(w, u, cand)
        avail = created[cand] <= tt[:, None]
        score = np.where(avail, f + _gumbel(rng, f.shape), -np.inf)
        j = np.argmax(score, axis=1)
        rows = np.arange(len(u))
        p = cand[rows, j]
        fj = f[rows, j]
        none = ~avail.any(axis=1)
        if none.any():  # no candidate released yet: the leaf's head product (always available)
            p[none] = first[none]
            fj[none] = _fit(w, u[none], p[none][:, None])[:, 0]
        prod[sl], fit[sl] = p, fj
    return prod, fit


def _choose_offers(w, users, prods, t, spec: SyntheticSpec, rng) -> np.ndarray:
    """The offer (index into the offers table) each interaction goes to, by user utility."""
    MO = spec.max_offers
    os_ = w["off_start"][prods]
    no = w["off_start"][prods + 1] - os_
    j = np.arange(MO)[None, :]
    valid = j < no[:, None]
    idx = np.where(valid, os_[:, None] + j, os_[:, None])
    sel = w["off_seller"][idx]
    util = (
        -w["user_alpha"][users][:, None] * w["off_logrel"][idx]
        + w["user_rho"][users][:, None] * (w["seller_rating"][sel] - 4.0)
        - w["user_gamma"][users][:, None] * (w["off_ship"][idx] - 3.0) / 3.0
        + COEF["region_bonus"] * (w["seller_region"][sel] == w["user_region"][users][:, None])
    )
    avail = valid & (w["seller_created"][sel] <= t[:, None]) & (t[:, None] < w["off_soldout_at"][idx])
    avail[:, 0] |= valid[:, 0]  # the primary offer is always available once the product is
    score = np.where(avail, util + _gumbel(rng, util.shape), -np.inf)
    k = np.argmax(score, axis=1)
    return idx[np.arange(len(users)), k]


def conversion_logits(
    w, users, prods, fit, offers=None, coef: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of P(cart | view) and P(purchase | cart). Without offers: a 4.0-rated, list-price,
    3-day-shipping offer (what the oracle uses)."""
    c = COEF if coef is None else coef
    z = w["prod_z"][prods]
    if offers is None:
        rating, logrel, ship = 4.0, 0.0, 3.0
    else:
        rating = w["seller_rating"][w["off_seller"][offers]]
        logrel = w["off_logrel"][offers]
        ship = w["off_ship"][offers]
    alpha = w["user_alpha"][users]
    if np.ndim(fit) == 2:
        alpha = alpha[:, None]
    cart = (
        c["cart_bias"]
        + c["cart_fit"] * fit
        + c["cart_rating"] * (rating - 4.0)
        - alpha * logrel
        + c["cart_price_z"] * z
    )
    buy = (
        c["buy_bias"]
        + c["buy_fit"] * fit
        + c["buy_rating"] * (rating - 4.0)
        - 0.5 * alpha * logrel
        + c["buy_shipping"] * (ship - 3.0)
    )
    return cart, buy


def simulate_chunk(
    w: dict, spec: SyntheticSpec, lo: int, hi: int, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Events of users ``lo..hi-1``, sorted by (user, time, event). Returns (columns, stats);
    columns: user, product, offer (index into the offers table), event (0 view, 1 cart,
    2 purchase), ts, quantity, session (per-user session number, in order of first event)."""
    start, T = spec.start_ts, spec.days * DAY
    end = start + T
    users = np.arange(lo, hi)
    n = w["user_n"][lo:hi]
    S = np.maximum(1, np.rint(n / spec.session_mean)).astype(np.int64)

    # sessions: start time (traffic-shaped, after signup) and the session's category
    sess_user = np.repeat(users, S)
    sess_time = _sample_times(w, w["user_active_start"][sess_user], start, end, rng)
    sess_leaf = _sample_leaves(w, sess_user, sess_time, spec, rng)
    sess_off = np.cumsum(S) - S

    # interactions: spread over the user's sessions, a few minutes apart
    iu = np.repeat(users, n)
    isess = sess_off[iu - lo] + np.floor(rng.random(len(iu)) * S[iu - lo]).astype(np.int64)
    order = np.argsort(isess, kind="stable")
    isess = isess[order]
    iu = sess_user[isess]
    N = len(isess)
    gaps = rng.exponential(COEF["session_gap_s"], N) + 5.0
    csum = np.cumsum(gaps)
    new_group = np.ones(N, bool)
    new_group[1:] = isess[1:] != isess[:-1]
    gstart = np.maximum.accumulate(np.where(new_group, np.arange(N), 0))
    offset = csum - csum[gstart]
    it = np.minimum(sess_time[isess] + offset.astype(np.int64), end - 1)
    wander = rng.random(N) < spec.wander
    ileaf = sess_leaf[isess].copy()
    if wander.any():
        ileaf[wander] = _sample_leaves(w, iu[wander], it[wander], spec, rng)

    prod, fit = _choose_products(w, iu, ileaf, it, spec, rng)
    offer = _choose_offers(w, iu, prod, it, spec, rng)

    # funnel: view -> cart -> purchase
    cart_l, buy_l = conversion_logits(w, iu, prod, fit, offer)
    carted = rng.random(N) < _sigmoid(cart_l)
    bought = carted & (rng.random(N) < _sigmoid(buy_l))
    t_cart = np.minimum(it + (5 + rng.exponential(40.0, N)).astype(np.int64), end - 1)
    t_buy = np.minimum(t_cart + (10 + rng.exponential(200.0, N)).astype(np.int64), end - 1)
    consumable = w["leaf_consumable"][w["prod_leaf"][prod]]
    qty_buy = np.where(consumable, 1 + rng.poisson(0.5, N), 1 + (rng.random(N) < 0.05)).astype(np.int32)

    cols = {
        "user": [iu, iu[carted], iu[bought]],
        "product": [prod, prod[carted], prod[bought]],
        "offer": [offer, offer[carted], offer[bought]],
        "event": [
            np.zeros(N, np.int8),
            np.ones(int(carted.sum()), np.int8),
            np.full(int(bought.sum()), 2, np.int8),
        ],
        "ts": [it, t_cart[carted], t_buy[bought]],
        "quantity": [np.ones(N, np.int32), np.ones(int(carted.sum()), np.int32), qty_buy[bought]],
        "skey": [isess, isess[carted], isess[bought]],
    }

    # repeat purchases of consumables: re-order the same product after a category-specific cycle
    next_key = len(sess_user)
    n_repeat = 0
    ru, rp, ro, rt, rq = (
        iu[bought & consumable],
        prod[bought & consumable],
        offer[bought & consumable],
        t_buy[bought & consumable],
        qty_buy[bought & consumable],
    )
    for _ in range(spec.repeat_rounds):
        if len(ru) == 0:
            break
        go = rng.random(len(ru)) < w["user_repeat"][ru]
        cyc = w["leaf_cycle_days"][w["prod_leaf"][rp]]
        gap = (rng.gamma(4.0, cyc / 4.0) * DAY).astype(np.int64)
        t_new = rt + gap
        keep = go & (t_new < end - 600)
        ru, rp, ro, rt, rq = ru[keep], rp[keep], ro[keep], t_new[keep], rq[keep]
        if len(ru) == 0:
            break
        # same seller when its offer is still in stock, else the primary offer
        gone = rt >= w["off_soldout_at"][ro]
        ro = np.where(gone, w["off_start"][rp], ro)
        m = len(ru)
        n_repeat += m
        keys = next_key + np.arange(m)
        next_key += m
        tb = rt + (10 + rng.exponential(60.0, m)).astype(np.int64)
        cols["user"] += [ru, ru]
        cols["product"] += [rp, rp]
        cols["offer"] += [ro, ro]
        cols["event"] += [np.ones(m, np.int8), np.full(m, 2, np.int8)]
        cols["ts"] += [rt, np.minimum(tb, end - 1)]
        cols["quantity"] += [np.ones(m, np.int32), rq]
        cols["skey"] += [keys, keys]

    out = {k: np.concatenate(v) for k, v in cols.items()}
    o = np.lexsort((out["event"], out["ts"], out["user"]))
    out = {k: v[o] for k, v in out.items()}

    # session numbers: per user, in order of each session's first row
    skey = out.pop("skey")
    _, first, inv = np.unique(skey, return_index=True, return_inverse=True)
    by_first = np.argsort(first)
    u_sorted = out["user"][first[by_first]]
    num_sorted = np.arange(len(first)) - np.searchsorted(u_sorted, u_sorted, side="left")
    num = np.empty(len(first), np.int64)
    num[by_first] = num_sorted
    out["session"] = num[inv]
    stats = {"interactions": int(N), "sessions": int(len(first)), "repeat_purchases": int(n_repeat)}
    return out, stats


# ----------------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------------


def oracle_log_scores(
    w: dict,
    params: dict,
    users: np.ndarray,
    at_time: float,
    include_popularity: bool = True,
    batch: int = 0,
) -> np.ndarray:
    """log P(user views p at ``at_time``) + log P(purchase | view) for all products (internal
    order), from the true factors. Products not yet released at ``at_time`` score ``-inf``.

    The funnel term uses a reference offer (rating 4, list price, 3-day shipping), see
    :func:`conversion_logits`."""
    start, T, explore = int(params["start_ts"]), int(params["period_s"]), float(params["explore"])
    c = {**COEF, **params.get("coef", {})}
    P = len(w["prod_leaf"])
    ls, leaf = w["leaf_start"], w["prod_leaf"]
    avail = w["prod_created"] <= at_time
    logpop = np.log(w["prod_pop"]) if include_popularity else np.zeros(P)
    base = np.where(avail, logpop, -np.inf).astype(np.float32)  # (P,)
    pvt = w["prod_vec"].T.astype(np.float32)
    z = w["prod_z"].astype(np.float32)
    # conversion logits are affine in fit: cart = c0 + c1 * fit (+ product terms), buy = b0 + b1 * fit
    cart0 = (c["cart_bias"] + c["cart_price_z"] * z).astype(np.float32)
    buy0 = np.float32(c["buy_bias"])
    out = np.empty((len(users), P), np.float32)
    batch = batch or int(np.clip(2**20 // P, 1, 256))  # ~4 MB temporaries: cache friendly
    for b0 in range(0, len(users), batch):
        u = users[b0 : b0 + batch]
        logq = np.log(leaf_probs(w, u, at_time, explore, start, T))  # (B, L)
        pp = w["user_pp"][u].astype(np.float32)[:, None]
        lam = w["user_lam"][u].astype(np.float32)[:, None]
        f = w["user_vec"][u].astype(np.float32) @ pvt  # (B, P) taste fit
        dz = np.subtract(z[None, :], pp)
        dz *= dz
        dz *= lam
        f -= dz
        lw = np.add(f, base[None, :], out=dz)
        lw -= lw.max(axis=1, keepdims=True)
        e = np.exp(lw)
        zl = np.add.reduceat(e, ls[:-1], axis=1)  # (B, L) per-leaf normaliser
        lleaf = (logq - np.log(np.maximum(zl, 1e-30))).astype(np.float32)
        # log sigmoid(cart) + log sigmoid(buy) = -log((1 + e^-cart) (1 + e^-buy))
        ec = np.minimum(-c["cart_fit"] * f - cart0[None, :], 30.0)
        np.exp(ec, out=ec)
        ec += 1.0
        eb = np.minimum(-c["buy_fit"] * f - buy0, 30.0)
        np.exp(eb, out=eb)
        eb += 1.0
        ec *= eb
        np.log(ec, out=ec)
        lw -= ec
        lw += lleaf[:, leaf]
        out[b0 : b0 + batch] = lw
    return out
