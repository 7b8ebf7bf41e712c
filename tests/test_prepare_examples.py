"""The numpy example builder (``examples.examples_from_lists``) against a plain-Python reference of the documented rules."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from data_pipelines.examples import SPLIT_CODE, ExampleSpec, examples_from_lists
from data_pipelines.schema import SPLITS

H = 3
WEIGHTS = (0.1, 0.5, 1.0)  # by event code: view, cart, purchase


def _random_users(rng: np.random.Generator, n_users: int, has_ts: bool) -> list[dict]:
    users = []
    for u in range(1, n_users + 1):
        n = int(rng.integers(1, 12))
        ev = {
            "p": rng.integers(1, 50, n).tolist(),
            "s": rng.integers(0, 5, n).tolist(),
            "t": rng.integers(0, 3, n).tolist(),
            "v": rng.choice([0, 0, 0, 1, 2], n).tolist(),
            # few distinct values: ties in ts, and (without time) a shuffled order
            "ts": sorted(rng.integers(0, 4, n).tolist()) if has_ts else [0] * n,
            "r": rng.permutation(1000)[:n].tolist(),
        }
        if has_ts:  # the lists are in (ts, rid) order
            order = sorted(range(n), key=lambda i: (ev["ts"][i], ev["r"][i]))
            ev = {k: [x[i] for i in order] for k, x in ev.items()}
        users.append({"user_idx": u * 7, **ev})
    return users


def _batch(users: list[dict], has_ts: bool) -> pa.RecordBatch:
    cols = {
        "user_idx": pa.array([u["user_idx"] for u in users], pa.int32()),
        "hp": pa.array([u["p"] for u in users], pa.list_(pa.int32())),
        "hs": pa.array([u["s"] for u in users], pa.list_(pa.int32())),
        "ht": pa.array([u["t"] for u in users], pa.list_(pa.int8())),
        "hv": pa.array([u["v"] for u in users], pa.list_(pa.int8())),
        "hr": pa.array([u["r"] for u in users], pa.list_(pa.int64())),
    }
    if has_ts:
        cols["hts"] = pa.array([u["ts"] for u in users], pa.list_(pa.int64()))
    return pa.RecordBatch.from_pydict(cols)


def _reference(users: list[dict], spec: ExampleSpec) -> list[dict]:
    """The rules of the module docstring, one example at a time."""
    rows = []
    for u in users:
        n = len(u["p"])
        for i in range(n):
            if u["t"][i] not in spec.positive_codes:
                continue
            split = u["v"][i]
            max_code = SPLIT_CODE["val"] if split == SPLIT_CODE["test"] else SPLIT_CODE["train"]
            visible = [j for j in range(n) if u["v"][j] <= max_code]  # in list order
            if spec.has_ts:
                hist = [j for j in visible if u["ts"][j] < u["ts"][i]][-H:] if H else []
            else:
                # the events after the example in the (seeded) list order, then wrapping to the
                # start, never the example itself
                after = [j for j in visible if j > i]
                before = [j for j in visible if j < i]
                hist = (after + before)[:H]
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


@pytest.mark.parametrize("has_ts", [True, False])
@pytest.mark.parametrize("positive", [(0, 1, 2), (2,)])
def test_examples_match_the_reference(has_ts: bool, positive: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    users = _random_users(rng, 40, has_ts)
    spec = ExampleSpec(has_ts, H, positive, WEIGHTS)
    batch = _batch(users, has_ts)
    # a sliced batch (as Arrow hands a task) must read only its own rows
    sliced = batch.slice(5, 30)
    got = [r for b in examples_from_lists(sliced, spec) for r in b.to_pylist()]
    assert got == _reference(users[5:35], spec)
    assert got  # the random data has examples of every kind
    assert {r["split"] for r in got} == set(SPLITS)
    parts = examples_from_lists(batch, spec)
    assert [p.column("split")[0].as_py() for p in parts] == list(SPLITS)  # one batch per split
    assert all(len(set(p.column("split").to_pylist())) == 1 for p in parts)


def test_history_of_an_example_never_sees_its_own_time_or_later() -> None:
    # one user: a view at t=1, two events tied at t=5, a purchase at t=9 (test split)
    users = [
        {"user_idx": 1, "p": [10, 11, 12, 13], "s": [1, 1, 2, 2], "t": [0, 2, 2, 2], "v": [0, 0, 0, 2],
         "ts": [1, 5, 5, 9], "r": [4, 1, 2, 3]},
    ]
    spec = ExampleSpec(True, 5, (2,), WEIGHTS)
    got = [r for b in examples_from_lists(_batch(users, True), spec) for r in b.to_pylist()]
    hist = {r["product_idx"]: r["hist_products"] for r in got}
    assert hist == {11: [10], 12: [10], 13: [10, 11, 12]}


def test_empty_lists_and_no_positive_events_give_no_batches() -> None:
    users = [{"user_idx": 1, "p": [3], "s": [0], "t": [0], "v": [0], "ts": [0], "r": [1]}]
    assert examples_from_lists(_batch(users, True), ExampleSpec(True, H, (2,), WEIGHTS)) == []
