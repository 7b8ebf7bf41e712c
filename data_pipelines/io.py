"""Reading the raw contract tables (see :mod:`data_pipelines.schema`).

A table ``NAME`` is ``NAME.parquet``, ``NAME.csv`` (or ``NAME.csv.gz``) or a folder ``NAME/`` of part
files (Parquet or CSV), under a local directory or any Hadoop URI (``hdfs://``, ``s3a://``,
``dbfs:/``, ``file://``...). CSV is read with a header and every column as a string; the validation
step parses types. Column names are normalised to stripped lower case.
"""

from __future__ import annotations

import os
import re
from typing import Any

from data_pipelines.schema import REQUIRED_COLUMNS, TABLES
from recsys.artifacts import sha256_file

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


class DataContractError(ValueError):
    """The raw data does not follow the contract; the message names the table, file and column."""


def _is_uri(path: str) -> bool:
    return bool(_SCHEME.match(path)) and not re.match(r"^[A-Za-z]:[\\/]", path)  # not C:\ paths


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if _is_uri(base) else os.path.join(base, name)


class _FS:
    """Minimal file-system view: local ``os`` calls, or the Hadoop FileSystem for URIs."""

    def __init__(self, spark: Any, base: str):
        self.local = not _is_uri(base) and (os.path.exists(base) or spark is None)
        self.spark = spark

    def _hpath(self, path: str):
        jvm = self.spark._jvm
        p = jvm.org.apache.hadoop.fs.Path(path)
        return p, p.getFileSystem(self.spark._jsc.hadoopConfiguration())

    def exists(self, path: str) -> bool:
        if self.local:
            return os.path.exists(path)
        p, fs = self._hpath(path)
        return bool(fs.exists(p))

    def is_dir(self, path: str) -> bool:
        if self.local:
            return os.path.isdir(path)
        p, fs = self._hpath(path)
        return bool(fs.getFileStatus(p).isDirectory())

    def files(self, path: str) -> list[tuple[str, int, int]]:
        """(path, bytes, mtime) of every data file under ``path`` (a file or a folder), sorted."""
        out: list[tuple[str, int, int]] = []
        if self.local:
            if os.path.isfile(path):
                st = os.stat(path)
                return [(path, st.st_size, int(st.st_mtime))]
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
                for n in sorted(names):
                    if n.startswith((".", "_")) or n.endswith(".crc"):
                        continue
                    fp = os.path.join(root, n)
                    st = os.stat(fp)
                    out.append((fp, st.st_size, int(st.st_mtime)))
            return out
        p, fs = self._hpath(path)
        it = fs.listFiles(p, True)
        while it.hasNext():
            st = it.next()
            name = st.getPath().getName()
            if name.startswith((".", "_")) or name.endswith(".crc"):
                continue
            out.append((st.getPath().toString(), int(st.getLen()), int(st.getModificationTime() // 1000)))
        return sorted(out)


def _folder_format(files: list[tuple[str, int, int]], folder: str) -> str:
    names = [os.path.basename(f[0]) for f in files]
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    if any(re.search(r"\.[ct]sv(\.[a-z0-9]+)?$", n) for n in names):
        return "csv"
    raise DataContractError(
        f"{folder}: cannot tell the format of the part files (expected *.parquet, *.csv or *.tsv), found {names[:5]}"
    )


def locate_table(spark: Any, data_dir: str, name: str) -> tuple[str, str] | None:
    """Find table ``name`` under ``data_dir``: ``(path, "csv"|"parquet")`` or None when absent."""
    fs = _FS(spark, data_dir)
    for suffix, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".csv.gz", "csv"), (".tsv", "csv"), (".tsv.gz", "csv")):
        p = _join(data_dir, name + suffix)
        if fs.exists(p) and not fs.is_dir(p):
            return p, fmt
        if fs.exists(p) and fs.is_dir(p):  # Spark writes "x.parquet/" folders too
            return p, _folder_format(fs.files(p), p)
    p = _join(data_dir, name)
    if fs.exists(p) and fs.is_dir(p):
        files = fs.files(p)
        if not files:
            raise DataContractError(f"table '{name}': folder {p} has no data files")
        return p, _folder_format(files, p)
    return None


def normalise_columns(df):
    """Strip and lower-case column names (CSV headers are often ``User_ID `` and the like)."""
    renamed = [c.strip().lower() for c in df.columns]
    if renamed == list(df.columns):
        return df
    return df.toDF(*renamed)


def _read_csv(spark: Any, path: str, sep: str):
    return (
        spark.read.option("header", True)
        .option("inferSchema", False)
        .option("mode", "PERMISSIVE")
        .option("escape", '"')
        .option("sep", sep)
        .csv(path)
    )


def read_table(spark: Any, path: str, fmt: str):
    if fmt == "parquet":
        df = spark.read.parquet(path)
    elif fmt == "csv":
        df = _read_csv(spark, path, ",")
        if len(df.columns) == 1:
            # a header read as one column holding another separator: tab-, semicolon- or pipe-separated
            sep = next((s for s in ("\t", ";", "|") if s in df.columns[0]), None)
            if sep is not None:
                df = _read_csv(spark, path, sep)
    else:  # pragma: no cover - locate_table only returns the two
        raise DataContractError(f"{path}: unknown format {fmt}")
    return normalise_columns(df)


def check_columns(name: str, df: Any, source: str) -> None:
    """Raise :class:`DataContractError` naming table, file and column when a required column is missing."""
    have = set(df.columns)
    for col in REQUIRED_COLUMNS.get(name, ()):
        if col not in have:
            raise DataContractError(
                f"table '{name}' ({source}): missing required column '{col}' "
                f"(found columns: {', '.join(df.columns) or 'none'})"
            )


def read_tables(spark: Any, data_dir: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Read every contract table present under ``data_dir``.

    Returns:
        ``(tables, sources)``: DataFrames by table name, and ``{name: {"path", "format"}}``.

    Raises:
        DataContractError: no events table, or a required column is missing.
    """
    tables: dict[str, Any] = {}
    sources: dict[str, dict[str, Any]] = {}
    for name in TABLES:
        loc = locate_table(spark, data_dir, name)
        if loc is None:
            continue
        path, fmt = loc
        df = read_table(spark, path, fmt)
        check_columns(name, df, path)
        tables[name] = df
        sources[name] = {"path": path, "format": fmt}
    if "events" not in tables:
        raise DataContractError(
            f"{data_dir}: no events table (expected events.csv, events.tsv, events.parquet or a folder events/)"
        )
    return tables, sources


def input_checksums(spark: Any, sources: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Checksums of the input files: sha256 for local files, size and mtime for remote ones."""
    out: dict[str, dict[str, Any]] = {}
    for name, src in sources.items():
        path = src.get("path")
        entry: dict[str, Any] = {k: v for k, v in src.items()}
        if path:
            fs = _FS(spark, path)
            files = {}
            for fp, size, mtime in fs.files(path):
                meta: dict[str, Any] = {"bytes": size}
                if fs.local:
                    meta["sha256"] = sha256_file(fp)
                else:
                    meta["mtime"] = mtime
                files[fp] = meta
            entry["files"] = files
        out[name] = entry
    return out
