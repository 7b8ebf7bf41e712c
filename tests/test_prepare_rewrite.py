"""Streaming Spark part files into fixed-size row groups (``data_pipelines.part_files.rewrite``)."""

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
