"""Part files into the artifact's Parquet files (``data_pipelines.part_files``): fixed-size row groups, exact schema, split by a column."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.part_files import rewrite as _rewrite


def test_remainders_carry_across_part_files_with_a_different_raw_schema(tmp_path) -> None:
    # Spark writes nullable fields and lists named "item"; the target schema is non-null with "element"
    # lists. A remainder (already cast) must combine with the next part's raw batches: at 10M events
    # the histories table failed here with "Schema at index 1 was different".
    raw = pa.schema([("user_idx", pa.int32()), ("products", pa.list_(pa.int32()))])
    target = pa.schema([pa.field("user_idx", pa.int32(), nullable=False),
                        pa.field("products", pa.list_(pa.field("element", pa.int32(), nullable=False)), nullable=False)])
    parts = []
    for i in range(3):
        rows = {"user_idx": list(range(5 * i, 5 * i + 5)), "products": [[j, j + 1] for j in range(5 * i, 5 * i + 5)]}
        p = tmp_path / f"part-{i}.parquet"
        pq.write_table(pa.table(rows, schema=raw), p)
        parts.append(p)
    dst = tmp_path / "out.parquet"
    assert _rewrite(parts, dst, 4, target, raw) == 15
    f = pq.ParquetFile(dst)
    assert f.schema_arrow == target
    assert [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)] == [4, 4, 4, 3]
    t = f.read()
    assert t["user_idx"].to_pylist() == list(range(15))
    assert t["products"].to_pylist() == [[j, j + 1] for j in range(15)]


def test_no_parts_writes_an_empty_file_with_the_schema(tmp_path) -> None:
    raw = pa.schema([("user_idx", pa.int32())])
    dst = tmp_path / "empty.parquet"
    assert _rewrite([], dst, 4, None, raw) == 0
    assert pq.read_table(dst).schema == raw and pq.read_table(dst).num_rows == 0


def _batches(rows: dict, size: int) -> list[pa.RecordBatch]:
    return pa.table(rows).to_batches(max_chunksize=size)


SPLIT_TARGET = pa.schema([("user_idx", pa.int32()), ("ts", pa.int64()), ("hist", pa.list_(pa.int32()))])


def _layout(values=("train", "val", "test")):
    from data_pipelines.part_files import SplitLayout

    return SplitLayout("split", values, ("user_idx", "ts", "rid"), ("rid",), 4, SPLIT_TARGET)


def test_split_batches_routes_rows_keeps_order_and_sizes_row_groups(tmp_path) -> None:
    from data_pipelines.part_files import split_batches

    n = 23
    rows = {
        "user_idx": pa.array([i // 4 for i in range(n)], pa.int32()),
        "ts": pa.array([i % 4 for i in range(n)], pa.int64()),
        "rid": pa.array(range(n), pa.int64()),
        # raw list field named like Spark's Arrow output; the target names it "item"
        "hist": pa.array([[i] * (i % 3) for i in range(n)], pa.list_(pa.field("element", pa.int32()))),
        "split": pa.array(["test" if i % 5 == 0 else "train" for i in range(n)]),
    }
    dsts = {v: tmp_path / f"{v}.parquet" for v in ("train", "val", "test")}
    counts = split_batches(iter(_batches(rows, 6)), dsts, _layout())
    assert counts == {"train": 18, "test": 5}  # no rows, no file
    assert not dsts["val"].exists()
    train = pq.ParquetFile(dsts["train"])
    assert train.schema_arrow == SPLIT_TARGET
    assert [train.metadata.row_group(i).num_rows for i in range(train.num_row_groups)] == [4, 4, 4, 4, 2]
    got = train.read()
    want = [i for i in range(n) if i % 5]
    assert got["user_idx"].to_pylist() == [i // 4 for i in want]
    assert got["hist"].to_pylist() == [[i] * (i % 3) for i in want]
    assert pq.read_table(dsts["test"])["ts"].to_pylist() == [i % 4 for i in range(0, n, 5)]


def test_split_batches_refuses_rows_out_of_order_even_across_batches(tmp_path) -> None:
    import pytest

    from data_pipelines.part_files import split_batches

    rows = {
        "user_idx": pa.array([1, 1, 2, 2, 1], pa.int32()),  # the last row goes back to user 1
        "ts": pa.array([1, 2, 1, 2, 3], pa.int64()),
        "rid": pa.array([0, 0, 0, 0, 0], pa.int64()),
        "hist": pa.array([[], [], [], [], []], pa.list_(pa.int32())),
        "split": pa.array(["train"] * 5),
    }
    dsts = {"train": tmp_path / "train.parquet"}
    with pytest.raises(RuntimeError, match=r"partition 3: rows of split='train' are not in \(user_idx, ts, rid\) order"):
        split_batches(iter(_batches(rows, 2)), dsts, _layout(("train",)), where="partition 3")
    with pytest.raises(ValueError, match="unexpected split value 'val'"):
        split_batches(iter(_batches({**rows, "user_idx": pa.array([1, 1, 2, 2, 3], pa.int32()),
                                     "split": pa.array(["train", "val", "train", "train", "train"])}, 5)),
                      dsts, _layout(("train",)))


def test_split_batches_checks_the_order_of_each_value_on_its_own(tmp_path) -> None:
    from data_pipelines.part_files import split_batches

    # batches grouped by value (as the example builder yields them): all train rows of users 1-2,
    # then the test rows of the same users; each value's rows are in order, the stream is not
    rows = {
        "user_idx": pa.array([1, 2, 1, 2, 3, 3], pa.int32()),
        "ts": pa.array([1, 1, 5, 5, 1, 5], pa.int64()),
        "rid": pa.array([0, 0, 0, 0, 0, 0], pa.int64()),
        "hist": pa.array([[1], [2], [3], [4], [5], [6]], pa.list_(pa.int32())),
        "split": pa.array(["train", "train", "test", "test", "train", "test"]),
    }
    dsts = {v: tmp_path / f"{v}.parquet" for v in ("train", "test")}
    assert split_batches(iter(_batches(rows, 2)), dsts, _layout(("train", "test"))) == {"train": 3, "test": 3}
    assert pq.read_table(dsts["train"])["hist"].to_pylist() == [[1], [2], [5]]
    assert pq.read_table(dsts["test"])["hist"].to_pylist() == [[3], [4], [6]]


def test_write_split_names_files_by_partition_and_fills_empty_values(spark, tmp_path) -> None:
    from data_pipelines.part_files import write_split

    df = spark.createDataFrame(
        [(u, t, u * 10 + t, [u], "train" if t else "test") for u in range(6) for t in range(3)],
        "user_idx int, ts long, rid long, hist array<int>, split string",
    ).repartition(3, "user_idx").sortWithinPartitions("user_idx", "ts", "rid")
    out = write_split(df, tmp_path, "ex", _layout())
    assert out["train"]["rows"] == 12 and out["test"]["rows"] == 6 and out["val"]["rows"] == 0
    assert out["val"]["files"] == ["ex/val/part-00000.parquet"]
    assert pq.read_table(tmp_path / "ex/val/part-00000.parquet").schema == SPLIT_TARGET
    train = pa.concat_tables([pq.read_table(tmp_path / f) for f in out["train"]["files"]])
    assert sorted(zip(train["user_idx"].to_pylist(), train["ts"].to_pylist(), strict=True)) == [
        (u, t) for u in range(6) for t in (1, 2)
    ]
    for f in out["train"]["files"]:  # each file: one partition, in (user_idx, ts) order
        t = pq.read_table(tmp_path / f)
        keys = list(zip(t["user_idx"].to_pylist(), t["ts"].to_pylist(), strict=True))
        assert keys == sorted(keys)
    assert not list((tmp_path / "ex").rglob("_s*"))  # temporary names all renamed
