"""Shared helpers for the prepare tests: a small raw contract dataset with known bad rows.

(No tests here; the module is imported by the other ``test_prepare_*`` files.)
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd

T0 = 1_600_000_000  # 2020-09-13
DAY = 86400


def iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_raw(seed: int = 3, n_users: int = 12, n_products: int = 16, n_events: int = 160) -> dict:
    """Raw contract tables as pandas frames (all strings, like CSV), plus ``good_events``.

    ``good_events`` are the rows that must be accepted (ts as int, no duplicates). Bad rows, one
    per reason, and an exact duplicate are appended to ``events``.
    """
    rng = np.random.default_rng(seed)
    users = [f"u{i}" for i in range(n_users)]
    products = [f"p{i}" for i in range(n_products)]
    sellers = [f"s{i}" for i in range(4)]
    types = ["view", "cart", "purchase"]
    cat = {p: (f"c{i % 3} > d{i % 2}" + (" > e" if i % 5 == 0 else "")) if i % 7 else "" for i, p in enumerate(products)}
    cat_rows = [
        {
            "product_id": p,
            "category": cat[p],
            "brand": f"b{i % 3}" if i % 4 else "",
            "price": f"{10 + 3 * i:.2f}" if i % 6 else "",
            "created_at": iso(T0 - (30 + i) * DAY) if i % 2 else "",
        }
        for i, p in enumerate(products)
    ]
    offer_rows = []
    for i, p in enumerate(products[:-2]):  # the last two products have no offers
        for k in range(1 + i % 3):
            s = sellers[(i + k) % len(sellers)]
            offer_rows.append(
                {
                    "product_id": p,
                    "seller_id": s,
                    "price": f"{9 + 3 * i + k:.2f}",
                    "stock": str(k * 2) if k else "",
                    "shipping_days": str(1 + k) if i % 2 else "",
                }
            )
    seller_rows = [
        {"seller_id": s, "rating": f"{3 + i * 0.5:.1f}" if i != 2 else "", "created_at": iso(T0 - 100 * DAY)}
        for i, s in enumerate(sellers)
    ]
    user_rows = [{"user_id": u, "region": "r" + str(i % 2), "signup_date": iso(T0 - 200 * DAY)} for i, u in enumerate(users)]

    good = []
    used = set()
    # the catalog product with index n_products - 1 gets no events (cold start); the one before it
    # only appears in the last days (test period): it must have zero train popularity
    warm = products[: n_products - 2]
    while len(good) < n_events:
        u = users[rng.integers(n_users)]
        p = warm[rng.integers(len(warm))]
        ts = int(T0 + rng.integers(0, 60 * DAY))
        if (u, ts) in used:
            continue
        used.add((u, ts))
        good.append({"user_id": u, "product_id": p, "event_type": types[rng.integers(3)], "ts": ts})
    late = products[n_products - 2]
    good.append({"user_id": users[0], "product_id": late, "event_type": "purchase", "ts": T0 + 61 * DAY})
    good.append({"user_id": users[1], "product_id": late, "event_type": "view", "ts": T0 + 61 * DAY + 5})
    # a tie: the same user, the same second, two events: neither may see the other
    good.append({"user_id": users[2], "product_id": products[1], "event_type": "purchase", "ts": T0 + 20 * DAY})
    good.append({"user_id": users[2], "product_id": products[2], "event_type": "purchase", "ts": T0 + 20 * DAY})
    offers_of: dict[str, list[str]] = {}
    for r in offer_rows:
        offers_of.setdefault(r["product_id"], []).append(r["seller_id"])
    for i, g in enumerate(good):
        opts = offers_of.get(g["product_id"], [])
        g["seller_id"] = opts[i % len(opts)] if opts and i % 9 else ""
        g["price"] = f"{5 + (i % 13):.2f}" if i % 4 else ""
    good_df = pd.DataFrame(good)

    def raw_row(g: dict, i: int) -> dict:
        et = g["event_type"]
        if et == "purchase" and i % 5 == 0:
            et = ""  # missing event_type means purchase
        return {
            "user_id": g["user_id"],
            "product_id": g["product_id"],
            "event_type": et,
            "timestamp": iso(g["ts"]) if i % 2 else str(g["ts"]),  # ISO and epoch mixed
            "seller_id": g["seller_id"],
            "price": g["price"],
        }

    ev_rows = [raw_row(g, i) for i, g in enumerate(good)]
    base = dict(ev_rows[0])
    bad = [
        ({**base, "user_id": ""}, "missing_user_id"),
        ({**base, "product_id": " "}, "missing_product_id"),
        ({**base, "event_type": "remove_from_cart"}, "unknown_event_type"),
        ({**base, "timestamp": ""}, "missing_timestamp"),
        ({**base, "timestamp": "yesterday"}, "bad_timestamp"),
        ({**base, "price": "abc"}, "bad_price"),
        ({**base, "price": "-3"}, "negative_price"),
        ({**base, "product_id": "not_in_catalog"}, "unknown_product"),
    ]
    events = ev_rows + [b for b, _ in bad] + [dict(ev_rows[3])]  # + one exact duplicate
    expected_events = {r: 1 for _, r in bad}
    expected_events["duplicate"] = 1

    # catalog-table bad rows
    cat_rows.append({**cat_rows[0], "price": "-1", "product_id": "pbad"})
    offer_rows.append({**offer_rows[0], "stock": "-2"})
    offer_rows.append(dict(offer_rows[1]))  # exact duplicate
    seller_rows.append({"seller_id": "", "rating": "4", "created_at": ""})
    user_rows.append({**user_rows[0], "signup_date": "not a date"})
    tables = {
        "events": pd.DataFrame(events),
        "products": pd.DataFrame(cat_rows),
        "offers": pd.DataFrame(offer_rows),
        "sellers": pd.DataFrame(seller_rows),
        "users": pd.DataFrame(user_rows),
    }
    expected = {
        "events": expected_events,
        "products": {"negative_price": 1},
        "offers": {"negative_stock": 1, "duplicate": 1},
        "sellers": {"missing_seller_id": 1},
        "users": {"bad_timestamp": 1},
    }
    return {"tables": tables, "good_events": good_df, "expected_rejected": expected}


def write_raw(tables: dict[str, pd.DataFrame], root: Path, fmt: str) -> Path:
    """Write the tables as ``NAME.csv`` or as folders ``NAME/`` of Parquet parts."""
    root.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        if fmt == "csv":
            df.to_csv(root / f"{name}.csv", index=False)
        else:
            (root / name).mkdir(exist_ok=True)
            half = len(df) // 2
            df.iloc[:half].to_parquet(root / name / "part-0.parquet", index=False)
            df.iloc[half:].to_parquet(root / name / "part-1.parquet", index=False)
    return root
