"""The numpy example and history builders (``examples``, ``histories``, ``user_events``) against plain-Python references of the documented rules."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from data_pipelines.examples import ExampleSpec, example_batches, examples_from_events
from data_pipelines.histories import HistorySpec, history_batches, history_from_events
from data_pipelines.schema import SPLITS
from data_pipelines.user_events import SPLIT_CODE, UserEvents, whole_users

H = 3
WEIGHTS = (0.1, 0.5, 1.0)  # by event code: view, cart, purchase


def _random_users(rng: np.random.Generator, n_users: int, has_ts: bool) -> list[dict]:
    """Users with events in event order: (ts, rid) with time, (k, rid) without (k: the seeded key)."""
    users = []
    for u in range(1, n_users + 1):
        n = int(rng.integers(1, 12))
        ev = {
            "p": rng.integers(1, 50, n).tolist(),
            "s": rng.integers(0, 5, n).tolist(),
            "t": rng.integers(0, 3, n).tolist(),
            "v": rng.choice([0, 0, 0, 1, 2], n).tolist(),
            # few distinct values: ties in ts
            "ts": rng.integers(0, 4, n).tolist() if has_ts else [0] * n,
            "r": rng.permutation(1000)[:n].tolist(),
            "k": rng.random(n).tolist(),
        }
        first_key = ev["ts"] if has_ts else ev["k"]
        order = sorted(range(n), key=lambda i, a=first_key, r=ev["r"]: (a[i], r[i]))
        users.append({"user_idx": u * 7, **{k: [x[i] for i in order] for k, x in ev.items()}})
    return users


def _table(users: list[dict], has_ts: bool) -> pa.Table:
    """Flat user_events rows, in the order prepare caches them: (user_idx, ts, rid)."""
    rows = [
        {"user_idx": u["user_idx"], "product_idx": u["p"][i], "seller_idx": u["s"][i], "event": u["t"][i],
         "split": u["v"][i], "ts": u["ts"][i], "rid": u["r"][i], "k": u["k"][i]}
        for u in users
        for i in range(len(u["p"]))
    ]
    rows.sort(key=lambda r: (r["user_idx"], r["ts"], r["rid"]))
    schema = pa.schema([("user_idx", pa.int32()), ("product_idx", pa.int32()), ("seller_idx", pa.int32()),
                        ("event", pa.int8()), ("split", pa.int8()), ("ts", pa.int64()), ("rid", pa.int64()),
                        ("k", pa.float64())])
    t = pa.Table.from_pylist(rows, schema=schema)
    return t if not has_ts else t.drop_columns(["k"])


def _reference(users: list[dict], spec: ExampleSpec) -> list[dict]:
    """The rules of the examples module docstring, one example at a time."""
    rows = []
    for u in users:
        n = len(u["p"])
        for i in range(n):
            if u["t"][i] not in spec.positive_codes:
                continue
            split = u["v"][i]
            max_code = SPLIT_CODE["val"] if split == SPLIT_CODE["test"] else SPLIT_CODE["train"]
            visible = [j for j in range(n) if u["v"][j] <= max_code]  # in event order
            if spec.has_ts:
                hist = [j for j in visible if u["ts"][j] < u["ts"][i]][-H:]
            else:
                # the events after the example in the seeded order, then wrapping to the start,
                # never the example itself
                hist = ([j for j in visible if j > i] + [j for j in visible if j < i])[:H]
            ts = u["ts"][i]
            rows.append(
                {
                    "user_idx": u["user_idx"],
                    "product_idx": u["p"][i],
                    "seller_idx": u["s"][i],
                    "weight": pytest.approx(WEIGHTS[u["t"][i]]),
                    "event": u["t"][i],
                    "ts": ts,
                    "hist_products": [u["p"][j] for j in hist],
                    "hist_sellers": [u["s"][j] for j in hist],
                    "hour": (ts // 3600) % 24 if spec.has_ts else -1,
                    "dow": (ts // 86400 + 3) % 7 if spec.has_ts else -1,
                    "rid": u["r"][i],
                    "split": SPLITS[split],
                }
            )
    # grouped by split (train, val, test), each in (user_idx, ts, rid) order
    return sorted(rows, key=lambda r: (SPLITS.index(r["split"]), r["user_idx"], r["ts"], r["rid"]))


def _by_split(batches) -> list[dict]:
    rows = [r for b in batches for r in b.to_pylist()]
    return sorted(rows, key=lambda r: SPLITS.index(r["split"]))  # stable: keeps each split's order


@pytest.mark.parametrize("has_ts", [True, False])
@pytest.mark.parametrize("positive", [(0, 1, 2), (2,)])
def test_examples_match_the_reference(has_ts: bool, positive: tuple[int, ...]) -> None:
    users = _random_users(np.random.default_rng(3), 40, has_ts)
    spec = ExampleSpec(has_ts, H, positive, WEIGHTS)
    table = _table(users, has_ts)
    want = _reference(users, spec)
    assert want and {r["split"] for r in want} == set(SPLITS)  # the random data has every kind
    # small Arrow batches regrouped into chunks of whole users (a user straddles batches)
    chunks = list(whole_users(iter(table.to_batches(max_chunksize=7)), min_rows=25))
    assert len(chunks) > 3 and sum(c.num_rows for c in chunks) == table.num_rows
    got = _by_split(b for c in chunks for b in examples_from_events(UserEvents.from_table(c, has_ts), spec))
    assert got == want
    parts = examples_from_events(UserEvents.from_table(table, has_ts), spec)
    assert [p.column("split")[0].as_py() for p in parts] == list(SPLITS)  # one batch per split
    assert all(len(set(p.column("split").to_pylist())) == 1 for p in parts)
    assert _by_split(example_batches(spec)(iter(table.to_batches(max_chunksize=5)))) == want


def test_history_of_an_example_never_sees_its_own_time_or_later() -> None:
    # one user: a view at t=1, two purchases tied at t=5, a purchase at t=9 (test split)
    users = [{"user_idx": 1, "p": [10, 11, 12, 13], "s": [1, 1, 2, 2], "t": [0, 2, 2, 2], "v": [0, 0, 0, 2],
              "ts": [1, 5, 5, 9], "r": [4, 1, 2, 3], "k": [0.0] * 4}]
    spec = ExampleSpec(True, 5, (2,), WEIGHTS)
    got = [r for b in examples_from_events(UserEvents.from_table(_table(users, True), True), spec) for r in b.to_pylist()]
    assert {r["product_idx"]: r["hist_products"] for r in got} == {11: [10], 12: [10], 13: [10, 11, 12]}


def test_order_only_timestamps_give_no_clock_context() -> None:
    """data.timestamps=order: the same histories as with times, but hour and day of week unknown (-1)."""
    users = [{"user_idx": 1, "p": [10, 11, 12], "s": [1, 1, 2], "t": [2, 2, 2], "v": [0, 0, 2],
              "ts": [90000, 90001, 90002], "r": [1, 2, 3], "k": [0.0] * 3}]
    e = UserEvents.from_table(_table(users, True), True)
    timed = [r for b in examples_from_events(e, ExampleSpec(True, 5, (2,), WEIGHTS)) for r in b.to_pylist()]
    ordered = [r for b in examples_from_events(e, ExampleSpec(True, 5, (2,), WEIGHTS, has_clock=False)) for r in b.to_pylist()]
    assert [r["hist_products"] for r in ordered] == [r["hist_products"] for r in timed] == [[], [10], [10, 11]]
    assert {(r["hour"], r["dow"]) for r in timed} == {(1, 4)} and {(r["hour"], r["dow"]) for r in ordered} == {(-1, -1)}


def test_no_positive_events_give_no_batches() -> None:
    users = [{"user_idx": 1, "p": [3], "s": [0], "t": [0], "v": [0], "ts": [0], "r": [1], "k": [0.5]}]
    assert examples_from_events(UserEvents.from_table(_table(users, True), True), ExampleSpec(True, H, (2,), WEIGHTS)) == []


def test_whole_users_refuses_users_out_of_order() -> None:
    t = pa.table({"user_idx": pa.array([1, 2, 1], pa.int32())})
    with pytest.raises(RuntimeError, match="not grouped by ascending user_idx"):
        list(whole_users(iter(t.to_batches(max_chunksize=2)), min_rows=1))


@pytest.mark.parametrize("has_ts", [True, False])
def test_histories_match_the_reference(has_ts: bool) -> None:
    users = _random_users(np.random.default_rng(5), 30, has_ts)
    table = _table(users, has_ts)
    specs = (HistorySpec("train", SPLIT_CODE["train"], 4), HistorySpec("full", None, 1 << 30))
    for spec in specs:
        want = []
        for u in users:
            keep = [i for i in range(len(u["p"])) if spec.max_code is None or u["v"][i] <= spec.max_code][-spec.max_len:]
            if keep:
                want.append({"user_idx": u["user_idx"], "products": [u["p"][i] for i in keep],
                             "sellers": [u["s"][i] for i in keep], "types": [u["t"][i] for i in keep]})
        assert history_from_events(UserEvents.from_table(table, has_ts), spec).to_pylist() == want
        got = [r for b in history_batches(specs, has_ts)(iter(table.to_batches(max_chunksize=4))) for r in b.to_pylist()]
        assert [{k: v for k, v in r.items() if k != "history"} for r in got if r["history"] == spec.name] == want
