"""The arrow and petastorm example loaders on a tiny examples Parquet (3 files, 9 row groups)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_pipelines.loaders import BATCH_KEYS, make_loader, pad_histories
from data_pipelines.schema import EXAMPLE_COLUMNS

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # petastorm on pyarrow 14

MAX_H = 5
ROWS = (37, 50, 23)  # per file; row groups of 16 → 3 + 4 + 2 = 9 row groups, 110 rows
N = sum(ROWS)
B = 8


def _write_examples(d, seed=0):
    rng = np.random.default_rng(seed)
    base = 0
    for f, n in enumerate(ROWS):
        lens = rng.integers(0, 12, n)  # up to 11 > MAX_H
        lens[:2] = 0
        offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        vals = rng.integers(1, 1000, offs[-1]).astype(np.int32)
        # one null history (row 1 of each file) must read as empty
        mask = np.zeros(n, bool)
        mask[1] = True
        hist_p = pa.ListArray.from_arrays(pa.array(offs), pa.array(vals), mask=pa.array(mask))
        table = pa.table(
            {
                "user_idx": pa.array(np.arange(base, base + n), pa.int32()),
                "product_idx": pa.array(rng.integers(1, 100, n), pa.int32()),
                "seller_idx": pa.array(rng.integers(0, 10, n), pa.int32()),
                "weight": pa.array(rng.random(n), pa.float32()),
                "event": pa.array(rng.integers(0, 3, n), pa.int8()),
                "ts": pa.array(rng.integers(0, 10**9, n), pa.int64()),
                "hist_products": hist_p,
                "hist_sellers": pa.ListArray.from_arrays(pa.array(offs), pa.array(vals % 7)),
                "hour": pa.array(rng.integers(-1, 24, n), pa.int8()),
                "dow": pa.array(rng.integers(-1, 7, n), pa.int8()),
            }
        )
        assert tuple(table.column_names) == EXAMPLE_COLUMNS
        pq.write_table(table, d / f"part-{f:05d}.parquet", row_group_size=16)
        base += n
    (d / "_SUCCESS").write_text("")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    d = tmp_path_factory.mktemp("examples")
    _write_examples(d)
    return str(d)


def _expected(examples):
    t = pq.read_table(examples).to_pylist()
    t.sort(key=lambda r: r["user_idx"])
    return {r["user_idx"]: r for r in t}


def _rows(batches):
    return torch.cat([b["user_idx"] for b in batches]).tolist()


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype, k
            assert torch.equal(x[k], y[k]), k


def test_pad_histories_keeps_last_items_left_aligned():
    offsets = np.array([0, 0, 3, 10])
    values = np.arange(1, 11)
    m, n = pad_histories(offsets, values, 4)
    assert m.tolist() == [[0, 0, 0, 0], [1, 2, 3, 0], [7, 8, 9, 10]]
    assert n.tolist() == [0, 3, 4]
    m0, n0 = pad_histories(np.array([0, 0]), np.zeros(0, np.int32), 3)
    assert m0.tolist() == [[0, 0, 0]] and n0.tolist() == [0]


@pytest.mark.parametrize("kind", ["arrow", "petastorm"])
def test_batches_content_dtypes_padding(examples, kind):
    loader = make_loader(kind, examples, batch_size=B, max_history=MAX_H, shuffle=False)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-N // B)
    assert _rows(batches) == list(range(N))  # files sorted, row groups in order
    exp = _expected(examples)
    for b in batches:
        assert set(b) == set(BATCH_KEYS)
        size = len(b["user_idx"])
        for k in BATCH_KEYS:
            assert b[k].dtype == (torch.float32 if k == "weight" else torch.int64), k
        assert b["hist_products"].shape == b["hist_sellers"].shape == (size, MAX_H)
        for i, u in enumerate(b["user_idx"].tolist()):
            r = exp[u]
            hist = (r["hist_products"] or [])[-MAX_H:]
            assert b["hist_products"][i].tolist() == hist + [0] * (MAX_H - len(hist))
            assert b["hist_len"][i].item() == len(hist)
            sh = r["hist_sellers"][-MAX_H:]
            assert b["hist_sellers"][i, : len(sh)].tolist() == sh
            for k in ("product_idx", "seller_idx", "event", "ts", "hour", "dow"):
                assert b[k][i].item() == r[k]
            assert b["weight"][i].item() == pytest.approx(r["weight"])


@pytest.mark.parametrize("drop_last", [False, True])
def test_arrow_and_petastorm_identical_unshuffled(examples, drop_last):
    a = list(make_loader("arrow", examples, B, MAX_H, shuffle=False, drop_last=drop_last))
    p = list(make_loader("petastorm", examples, B, MAX_H, shuffle=False, drop_last=drop_last))
    _same(a, p)
    assert len(a) == (N // B if drop_last else -(-N // B))


@pytest.mark.parametrize("kind", ["arrow", "petastorm"])
def test_shuffle_deterministic_and_exactly_once_per_epoch(examples, kind):
    loader = make_loader(kind, examples, B, MAX_H, shuffle=True, seed=5, buffer_rows=32)
    e0 = list(loader)
    _same(e0, list(make_loader(kind, examples, B, MAX_H, shuffle=True, seed=5, buffer_rows=32)))
    loader.set_epoch(1)
    e1 = list(loader)
    for batches in (e0, e1):
        assert sorted(_rows(batches)) == list(range(N))
        assert len(batches) == len(loader)
    assert _rows(e0) != _rows(e1) != list(range(N))
    other_seed = list(make_loader(kind, examples, B, MAX_H, shuffle=True, seed=6, buffer_rows=32))
    assert _rows(other_seed) != _rows(e0)


@pytest.mark.parametrize("kind", ["arrow", "petastorm"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharding_disjoint_equal_batch_counts(examples, kind, world_size):
    seen, counts = [], []
    for rank in range(world_size):
        loader = make_loader(kind, examples, B, MAX_H, shuffle=True, seed=1, rank=rank, world_size=world_size)
        batches = list(loader)
        counts.append((len(loader), len(batches)))
        rows = _rows(batches)
        assert len(rows) == len(set(rows))
        seen.append(set(rows))
    assert len({c for pair in counts for c in pair}) == 1, counts
    for i in range(world_size):
        for j in range(i + 1, world_size):
            assert not seen[i] & seen[j]
    if kind == "arrow":  # equal row ranges: at most world_size - 1 rows skipped
        assert sum(map(len, seen)) == N - N % world_size


def test_arrow_workers_same_batches(examples):
    kw = dict(shuffle=True, seed=2, buffer_rows=24)
    single = list(make_loader("arrow", examples, B, MAX_H, num_workers=0, **kw))
    loader = make_loader("arrow", examples, B, MAX_H, num_workers=2, **kw)
    multi = list(loader)
    assert len(multi) == len(loader) == len(single)
    key = lambda b: tuple(b["user_idx"].tolist())  # noqa: E731
    assert sorted(map(key, single)) == sorted(map(key, multi))  # same batches, interleaved order
    by_key = {key(b): b for b in single}
    for b in multi:
        _same([b], [by_key[key(b)]])


def test_petastorm_workers_cover_once(examples):
    loader = make_loader("petastorm", examples, B, MAX_H, shuffle=True, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(loader)
    assert sorted(_rows(batches)) == list(range(N))


def test_make_loader_errors(examples, tmp_path):
    with pytest.raises(ValueError, match="unknown loader kind"):
        make_loader("tfrecord", examples, B, MAX_H)
    with pytest.raises(FileNotFoundError):
        make_loader("arrow", str(tmp_path / "missing"), B, MAX_H)
    with pytest.raises(ValueError, match="rank"):
        make_loader("arrow", examples, B, MAX_H, rank=2, world_size=2)
