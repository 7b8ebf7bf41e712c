"""Built-in synthetic marketplace: raw-contract tables with a planted, documented, learnable signal.

``generate(out_dir, preset, seed)`` writes, in the raw contract of :mod:`data_pipelines.schema`::

    events/part-00000.parquet ...  one part file per chunk of users (always a folder, even for one part)
    products.parquet  offers.parquet  sellers.parquet  users.parquet
    generator.json    README.txt      preset, seed, spec, counts, period
    _latent/latent.npz, _latent/params.json   the true factors (for ``oracle_scores``; not model input)

Column types: IDs and names are strings (``u000123``, ``p00042``, ``s0007``); ``events.timestamp``,
``products.created_at`` and ``sellers.created_at`` are ``timestamp[ms, UTC]`` holding whole seconds
(Parquet has no seconds unit); ``users.signup_date`` is ``date32``; prices are float64; ``quantity``,
``stock`` and ``shipping_days`` are int32. An event's ``price`` is the chosen offer's price. Events
are sorted by (user, time) within a part; ``session_id`` is ``<user_id>-<nnnn>``.

Presets (``PRESETS``): ``tiny`` (tests: 1.5k users, 800 products, 40 sellers, ~40k events), ``small``
(3k / 2k / 100 / ~100k), ``medium`` (50k / 50k / 1k / ~1M), ``large`` (500k / 200k / 5k / ~10M).
Same preset + seed gives the same rows and the same Parquet bytes. Users are simulated in chunks
(``spec.chunk_users``) with one RNG per chunk (``default_rng([seed, 1, chunk])``), fully vectorised,
so the ``large`` preset (10M events) runs in a few minutes with memory bounded by one chunk.

Generative model
----------------
Period: ``spec.days`` days from ``spec.start`` (UTC). Traffic follows an hourly intensity: a daily
curve (night trough, lunch and evening peaks) x weekday (weekend +30%, Monday +10%) x slow growth
(+30% over the period). All event times lie in [start, end).

Catalog. A regular 3-level category tree (``n_l1 x n_l2 x n_l3`` leaves, paths like
``electronics > audio > audio pro``); category popularity is a product of Dirichlet weights per
level. Brands belong to one top-level category, have Zipf sizes, a prestige (log-price premium) and
a latent vector ``b`` (``latent_dim``). Each product has a leaf, a brand (by brand size within the
leaf's top-level category), a relative log-price ``z`` = brand prestige + noise (its price is the
leaf's median price x ``exp(z)``), a latent style vector ``v`` and a popularity ``pop ~ rank^-zipf_a``
(long tail). ~``cold_start_fraction`` of the products are created in the last
``cold_start_window`` of the period (cold start): they have no events before ``created_at``.

Sellers have Zipf sizes, a rating in [1, 5] (mostly 3.5-5), a region, a price level (better-rated
sellers are slightly dearer), a base shipping time and 1-2 home top-level categories;
~``late_seller_fraction`` join during the period and sell only after ``created_at``. Each product has
1..``max_offers`` offers (popular products more), from sellers of its top-level category drawn by
seller size; the primary offer is from a seller present from the start and never sells out. Offer
price = list price x exp(seller price level + noise). ``out_of_stock_fraction`` of the other offers
sell out at a random time in the period (stock 0 in ``offers``; not chosen after that time).

Users. Each user has ``interests`` category slots: 1-3 top-level interests (by category popularity),
per top-level interest a primary sub-category (used by 60% of its slots), leaves by popularity.
Slot ``k`` has weight ``softmax(a_k + phase(t) * g_k)`` with ``phase`` going from -0.5 to 0.5 over
the period and ``g_k ~ N(0, drift)``: tastes drift slowly (some interests fade, others grow). Users
also have a brand taste and a style taste (``u`` in R^{2 latent_dim}), a preferred relative price
``pp`` and a price-fit strictness ``lam``, a price sensitivity ``alpha``, a seller-rating sensitivity
``rho``, a shipping sensitivity ``gamma``, a region and a re-order propensity. Their activity is
log-normal (light and heavy users; median ~10-20 interactions) times the share of the period after
their signup (``new_user_fraction`` sign up inside the period).

    fit(u, p) = 1.0 * <u_brand, b_brand(p)>/sqrt(d) + 0.8 * <u_style, v_p>/sqrt(d) - lam_u (z_p - pp_u)^2

Events. Each user's interactions are split into sessions (~``session_mean`` interactions, a
traffic-shaped start time after signup, ~75 s between interactions). A session has one category
drawn from the user's taste at that time (with probability ``explore`` from global category
popularity); ``wander`` of the interactions draw their own category. Within the category the product
is chosen by sample-then-reweight: ``candidates`` products drawn by popularity, released ones kept,
one picked with probability ~ ``exp(fit)`` (Gumbel-max); so P(p | leaf, u) ~ pop_p exp(fit(u, p)).
The seller is the offer maximising ``-alpha_u log(price/list) + rho_u (rating-4) - gamma_u
(ship-3)/3 + 0.4 [same region] + Gumbel`` among offers whose seller exists and which are in stock.
Every interaction is a ``view``; it becomes a ``cart`` with probability
``sigmoid(-2.7 + 0.8 fit + 0.6 (rating-4) - alpha log(price/list) - 0.3 z)`` and then a ``purchase``
with ``sigmoid(-0.8 + 0.5 fit + 0.8 (rating-4) - 0.5 alpha log(price/list) - 0.1 (ship-3))``
(cart and purchase rows follow the view by seconds to minutes). Purchases in consumable top-level
categories (grocery, beauty, pets, health) are re-ordered (cart + purchase, new session) from the
same seller (the primary offer if it sold out) after Gamma-distributed, category-specific cycles
(14-60 days) with the user's re-order propensity, up to ``repeat_rounds`` times.

Oracle. ``oracle_scores`` returns, per user and product, ``log P(view p at t) + log P(purchase |
view)`` from the true factors: ``P(leaf | u, t) * pop_p exp(fit) / sum_leaf(pop exp(fit))`` times the
funnel probabilities for a reference offer (rating 4, list price, 3-day shipping). Products not yet
released at ``t`` score ``-inf``.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipelines.schema import EVENT_TYPES
from data_pipelines.synthetic_model import (
    COEF,
    DAY,
    REGIONS,
    SyntheticSpec,
    build_world,
    oracle_log_scores,
    simulate_chunk,
)

__all__ = ["PRESETS", "SyntheticSpec", "generate", "oracle_scores", "load_latent", "GENERATOR_VERSION"]

GENERATOR_VERSION = 1
LATENT_DIR = "_latent"
EVENTS_DIR = "events"
TABLE_FILES = ("products.parquet", "offers.parquet", "sellers.parquet", "users.parquet")

PRESETS: dict[str, SyntheticSpec] = {
    # for tests: ~40k events in about a second
    "tiny": SyntheticSpec(
        n_users=1500, n_products=800, n_sellers=40, n_events=40_000, n_l1=6, n_l2=3, n_l3=3, n_brands=60
    ),
    "small": SyntheticSpec(n_users=3000, n_products=2000, n_sellers=100, n_events=100_000),
    "medium": SyntheticSpec(
        n_users=50_000,
        n_products=50_000,
        n_sellers=1000,
        n_events=1_000_000,
        n_l1=10,
        n_l2=6,
        n_l3=5,
        n_brands=1500,
        chunk_users=25_000,
    ),
    "large": SyntheticSpec(
        n_users=500_000,
        n_products=200_000,
        n_sellers=5000,
        n_events=10_000_000,
        n_l1=12,
        n_l2=8,
        n_l3=6,
        n_brands=5000,
        chunk_users=25_000,
    ),
}

# whole seconds, stored as a Parquet TIMESTAMP(MILLIS, UTC) (Parquet has no seconds unit)
TS = pa.timestamp("ms", tz="UTC")


def _width(n: int, minimum: int) -> int:
    return max(minimum, len(str(max(n - 1, 0))))


def _ids(prefix: str, n: int, width: int) -> pa.Array:
    return pa.array([f"{prefix}{i:0{width}d}" for i in range(n)], pa.string())


def _ts(a: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(a, np.int64) * 1000, pa.int64()).cast(TS)


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="snappy")


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez`` but byte-deterministic (fixed zip timestamps, sorted members)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, buf.getvalue())


def resolve_spec(preset: str | SyntheticSpec, overrides: dict | None = None) -> SyntheticSpec:
    if isinstance(preset, SyntheticSpec):
        spec = preset
    elif preset in PRESETS:
        spec = PRESETS[preset]
    else:
        raise ValueError(f"unknown synthetic preset {preset!r}; choose one of {sorted(PRESETS)}")
    return replace(spec, **overrides) if overrides else spec


def generate(
    out_dir: str | Path,
    preset: str | SyntheticSpec = "small",
    seed: int = 7,
    progress: Callable[[str], None] | None = None,
    overrides: dict | None = None,
) -> dict:
    """Generate a synthetic marketplace into ``out_dir`` (see the module docstring).

    ``overrides`` replaces fields of the preset's :class:`SyntheticSpec` (e.g. ``{"n_users": 500}``).
    Existing outputs of a previous run in ``out_dir`` are replaced; other files are left alone.
    Returns a summary dict of counts (also stored in ``generator.json``) plus ``seconds``.
    """
    t0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    spec = resolve_spec(preset, overrides)
    preset_name = preset if isinstance(preset, str) else "custom"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (EVENTS_DIR, LATENT_DIR):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in (*TABLE_FILES, "events.parquet", "generator.json", "README.txt"):
        (out / name).unlink(missing_ok=True)

    w, names = build_world(spec, seed)
    U, P, S = spec.n_users, spec.n_products, spec.n_sellers
    wu, wp, ws = _width(U, 6), _width(P, 5), _width(S, 4)
    user_ids = _ids("u", U, wu)
    seller_ids = _ids("s", S, ws)
    prod_ids_internal = pc.take(_ids("p", P, wp), pa.array(w["prod_id_num"]))  # internal index -> id
    say(f"world: {U} users, {P} products, {S} sellers, {len(w['off_prod'])} offers")

    # --- static tables (rows sorted by id) -------------------------------------------------
    p_order = np.argsort(w["prod_id_num"])
    leaf_names = pa.array(names["leaf"], pa.string())
    brand_names = pa.array(names["brand"], pa.string())
    products = pa.table(
        {
            "product_id": pc.take(prod_ids_internal, pa.array(p_order)),
            "category": pc.take(leaf_names, pa.array(w["prod_leaf"][p_order])),
            "brand": pc.take(brand_names, pa.array(w["prod_brand"][p_order])),
            "title": pa.array([names["title"][i] for i in p_order], pa.string()),
            "price": pa.array(w["prod_price"][p_order], pa.float64()),
            "created_at": _ts(w["prod_created"][p_order]),
        }
    )
    _write(products, out / "products.parquet")
    o_order = np.lexsort((w["off_seller"], w["prod_id_num"][w["off_prod"]]))
    offers = pa.table(
        {
            "product_id": pc.take(prod_ids_internal, pa.array(w["off_prod"][o_order])),
            "seller_id": pc.take(seller_ids, pa.array(w["off_seller"][o_order])),
            "price": pa.array(w["off_price"][o_order], pa.float64()),
            "stock": pa.array(w["off_stock"][o_order].astype(np.int32), pa.int32()),
            "shipping_days": pa.array(w["off_ship"][o_order].astype(np.int32), pa.int32()),
        }
    )
    _write(offers, out / "offers.parquet")
    regions = pa.array(list(REGIONS), pa.string())
    sellers = pa.table(
        {
            "seller_id": seller_ids,
            "rating": pa.array(w["seller_rating"], pa.float64()),
            "region": pc.take(regions, pa.array(w["seller_region"])),
            "created_at": _ts(w["seller_created"]),
        }
    )
    _write(sellers, out / "sellers.parquet")
    users = pa.table(
        {
            "user_id": user_ids,
            "region": pc.take(regions, pa.array(w["user_region"])),
            "signup_date": pa.array((w["user_signup"] // DAY).astype(np.int32), pa.date32()),
        }
    )
    _write(users, out / "users.parquet")

    # --- events, one part file per user chunk ------------------------------------------------
    ev_dir = out / EVENTS_DIR
    ev_dir.mkdir()
    event_names = pa.array(list(EVENT_TYPES), pa.string())
    counts = {"events": 0, "views": 0, "carts": 0, "purchases": 0}
    stats_tot = {"interactions": 0, "sessions": 0, "repeat_purchases": 0}
    n_chunks = math.ceil(U / spec.chunk_users)
    for c in range(n_chunks):
        lo, hi = c * spec.chunk_users, min(U, (c + 1) * spec.chunk_users)
        cols, st = simulate_chunk(w, spec, lo, hi, np.random.default_rng([seed, 1, c]))
        uid = pc.take(user_ids, pa.array(cols["user"]))
        offer = cols["offer"]
        sess = pa.array(cols["session"]).cast(pa.string())
        table = pa.table(
            {
                "user_id": uid,
                "product_id": pc.take(prod_ids_internal, pa.array(cols["product"])),
                "event_type": pc.take(event_names, pa.array(cols["event"])),
                "timestamp": _ts(cols["ts"]),
                "seller_id": pc.take(seller_ids, pa.array(w["off_seller"][offer])),
                "price": pa.array(w["off_price"][offer], pa.float64()),
                "quantity": pa.array(cols["quantity"], pa.int32()),
                "session_id": pc.binary_join_element_wise(uid, pc.utf8_lpad(sess, 4, "0"), "-"),
            }
        )
        _write(table, ev_dir / f"part-{c:05d}.parquet")
        ev = np.bincount(cols["event"], minlength=3)
        counts["events"] += len(table)
        counts["views"] += int(ev[0])
        counts["carts"] += int(ev[1])
        counts["purchases"] += int(ev[2])
        for k in stats_tot:
            stats_tot[k] += st[k]
        say(f"events part {c + 1}/{n_chunks}: users {lo}..{hi - 1}, {len(table)} rows")
        del cols, table

    # --- latent factors and description ----------------------------------------------------
    (out / LATENT_DIR).mkdir()
    _save_npz(out / LATENT_DIR / "latent.npz", w)
    params = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "start_ts": spec.start_ts,
        "period_s": spec.days * DAY,
        "explore": spec.explore,
        "coef": COEF,
        "id_width": {"user": wu, "product": wp, "seller": ws},
    }
    (out / LATENT_DIR / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    summary = {
        "generator_version": GENERATOR_VERSION,
        "preset": preset_name,
        "seed": seed,
        "start": _iso(spec.start_ts),
        "end": _iso(spec.end_ts),
        "users": U,
        "products": P,
        "sellers": S,
        "offers": int(len(w["off_prod"])),
        "out_of_stock_offers": int((w["off_stock"] == 0).sum()),
        "cold_start_products": int((w["prod_created"] >= spec.start_ts).sum()),
        "late_sellers": int((w["seller_created"] >= spec.start_ts).sum()),
        "new_users": int((w["user_signup"] >= spec.start_ts).sum()),
        **counts,
        **stats_tot,
        "event_parts": n_chunks,
    }
    meta = {
        **summary,
        "layout": {"events": f"{EVENTS_DIR}/part-*.parquet", "latent": LATENT_DIR},
        "spec": spec.to_dict(),
    }
    (out / "generator.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (out / "README.txt").write_text(_readme(summary, spec))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    say(f"done: {counts['events']} events in {summary['seconds']} s")
    return summary


def _readme(summary: dict, spec: SyntheticSpec) -> str:
    return (
        "Synthetic marketplace generated by data_pipelines.synthetic "
        f"(generator v{GENERATOR_VERSION}, preset {summary['preset']}, seed {summary['seed']}).\n"
        f"Period {summary['start']} .. {summary['end']} ({spec.days} days).\n\n"
        "Raw-contract tables (data_pipelines/schema.py):\n"
        f"  events/part-*.parquet  {summary['events']} rows: {summary['views']} views, {summary['carts']} carts, "
        f"{summary['purchases']} purchases ({summary['repeat_purchases']} re-orders)\n"
        f"  products.parquet  {summary['products']} ({summary['cold_start_products']} released during the period)\n"
        f"  offers.parquet    {summary['offers']} ({summary['out_of_stock_offers']} out of stock)\n"
        f"  sellers.parquet   {summary['sellers']} ({summary['late_sellers']} joined during the period)\n"
        f"  users.parquet     {summary['users']} ({summary['new_users']} signed up during the period)\n\n"
        "_latent/ holds the true factors used by data_pipelines.synthetic.oracle_scores; it is not\n"
        "model input. The generative model is documented in data_pipelines/synthetic.py.\n"
        "generator.json: the full spec and counts.\n"
    )


# ----------------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------------


def _latent_dir(path: str | Path) -> Path:
    p = Path(path)
    if (p / LATENT_DIR).is_dir():
        p = p / LATENT_DIR
    if not (p / "latent.npz").is_file():
        raise FileNotFoundError(f"no synthetic latent factors (latent.npz) under {path}")
    return p


def load_latent(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """The true factors and parameters of a generated folder (its root or its ``_latent/``)."""
    p = _latent_dir(path)
    with np.load(p / "latent.npz", allow_pickle=False) as z:
        w = {k: z[k] for k in z.files}
    return w, json.loads((p / "params.json").read_text())


def _to_epoch(t) -> float:
    if isinstance(t, str):
        t = datetime.fromisoformat(t.replace("Z", "+00:00"))
    if isinstance(t, datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        return t.timestamp()
    if isinstance(t, np.datetime64):
        return float(t.astype("datetime64[s]").astype(np.int64))
    if hasattr(t, "timestamp"):  # pandas.Timestamp
        return float(t.timestamp())
    return float(t)


def oracle_scores(
    latent_dir_or_out_dir: str | Path,
    user_ids: list[str],
    at_time: float | str | datetime | None = None,
    include_popularity: bool = True,
) -> tuple[list[str], np.ndarray]:
    """True preference scores of ``user_ids`` for every product at ``at_time``.

    Returns ``(product_ids, scores)``: product ids sorted ascending and a float32 array
    ``[len(user_ids), n_products]`` of ``log P(view) + log P(purchase | view)`` under the generative
    model (higher is better; ``-inf`` for products released after ``at_time``). ``at_time``: epoch
    seconds, ISO-8601 string or datetime; default the end of the period. ``include_popularity=False``
    drops the product popularity prior (pure taste). Unknown user ids raise ``KeyError``.
    """
    w, params = load_latent(latent_dir_or_out_dir)
    width = int(params["id_width"]["user"])
    n_users = len(w["user_n"])
    idx = np.empty(len(user_ids), np.int64)
    for i, uid in enumerate(user_ids):
        s = str(uid)
        num = s[1:]
        if not (s.startswith("u") and num.isdigit() and len(num) == width and int(num) < n_users):
            raise KeyError(f"unknown synthetic user id {uid!r}")
        idx[i] = int(num)
    t = params["start_ts"] + params["period_s"] if at_time is None else _to_epoch(at_time)
    scores = oracle_log_scores(w, params, idx, t, include_popularity=include_popularity)
    order = np.argsort(w["prod_id_num"])
    wp = int(params["id_width"]["product"])
    product_ids = [f"p{i:0{wp}d}" for i in range(len(order))]
    return product_ids, np.ascontiguousarray(scores[:, order])
