"""Row-level validation of the raw tables: typed accepted rows, and every rejected row with a reason.

Nothing is lost: each input row is either accepted, rejected with the first failing reason, or an
exact duplicate of an accepted row (rejected with reason ``duplicate``). Invariant::

    input rows = accepted + rejected (all reasons but duplicate) + duplicates

Rows are first grouped by all their raw columns (a hash aggregate, cheaper than a window), so
validation runs once per distinct row; the multiplicity ``_n`` expands the rejected output again.
The events are shuffled for it by their typed user id, so they leave validation partitioned by user.

Reasons, in the order they are checked (a row gets the first that applies):

- ``missing_<id>``: a required id is null or empty (ids are cast to strings and trimmed).
- ``unknown_event_type``: event_type not in view|cart|purchase nor one of their common other names
  (``schema.EVENT_ALIASES``, matched ignoring case, spaces and punctuation; missing/empty means purchase).
- ``missing_timestamp`` / ``bad_timestamp``: the events have timestamps but this row's is empty /
  unparsable (ISO-8601 strings, epoch seconds, milliseconds, microseconds or nanoseconds as numbers
  or numeric strings, told apart by magnitude, or timestamp columns).
  ``bad_timestamp`` also covers unparsable ``created_at`` / ``signup_date`` on catalog tables.
- ``bad_<col>`` / ``negative_<col>``: unparsable or negative price, stock, shipping_days, rating.
- ``bad_split``: a ``split`` column value other than train|val|test.
- ``unknown_product``: an event for a product absent from a provided products catalog (checked
  against the catalog's non-empty ids, so a catalog row rejected for, say, a bad price does not
  drop that product's events).
- ``duplicate_key``: catalog tables only; a second, different row for the same key (product_id;
  seller_id; user_id; product_id+seller_id for offers). The row kept is the one with the smallest
  content hash (deterministic).
- ``duplicate``: an exact copy of an accepted row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from data_pipelines.schema import EPOCH_UNITS, EVENT_ALIASES, EVENT_CODE, EVENT_TYPES

_T = "t__"  # prefix of typed columns inside a flagged frame


def qcol(name: str) -> Column:
    """A column reference that is safe for names with dots, spaces or backticks."""
    return F.col("`" + name.replace("`", "``") + "`")


def _is_fractional(dt: T.DataType) -> bool:
    return isinstance(dt, (T.FloatType, T.DoubleType, T.DecimalType))


def _is_numeric(dt: T.DataType) -> bool:
    return isinstance(dt, T.NumericType)


def id_col(c: Column, dt: T.DataType) -> Column:
    """Cast an id to a trimmed string; integral floats lose their ``.0``; empty becomes null."""
    if _is_fractional(dt):
        s = F.when(c == F.floor(c), F.floor(c).cast("long").cast("string")).otherwise(c.cast("string"))
    else:
        s = c.cast("string")
    s = F.trim(s)
    return F.when(s == "", F.lit(None).cast("string")).otherwise(s)


def _present(c: Column, dt: T.DataType) -> Column:
    """The raw value is there (not null, and not an empty string)."""
    if isinstance(dt, T.StringType):
        return c.isNotNull() & (F.trim(c) != "")
    return c.isNotNull()


def num_col(c: Column, dt: T.DataType) -> tuple[Column, Column]:
    """``(value as double, is_bad)``: bad = present but unparsable or NaN/infinite."""
    if isinstance(dt, T.StringType):
        v = F.trim(c).cast("double")
    elif _is_numeric(dt):
        v = c.cast("double")
    else:
        v = c.cast("string").cast("double")
    ok = v.isNotNull() & ~F.isnan(v) & (F.abs(v) != float("inf"))
    bad = _present(c, dt) & ~ok
    return F.when(ok, v), bad


_NUMERIC_STR = r"^[+-]?[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?$"


def epoch_col(c: Column, dt: T.DataType) -> tuple[Column, Column]:
    """``(epoch seconds as long, is_bad)`` from ISO-8601 strings, epoch numbers or timestamp columns."""
    if isinstance(dt, T.TimestampType):
        v = c.cast("long")
    elif isinstance(dt, T.TimestampNTZType):
        v = F.unix_timestamp(c.cast("timestamp"))
    elif isinstance(dt, T.DateType):
        v = c.cast("timestamp").cast("long")
    elif _is_numeric(dt):
        v = _epoch_seconds(c.cast("double"))
    else:
        s = F.trim(c.cast("string"))
        v = F.when(s.rlike(_NUMERIC_STR), _epoch_seconds(s.cast("double"))).otherwise(s.cast("timestamp").cast("long"))
    return v, _present(c, dt) & v.isNull()


def _epoch_seconds(d: Column) -> Column:
    """Whole epoch seconds from a number in seconds, milliseconds, microseconds or nanoseconds.

    The unit is told by magnitude, row by row (``schema.EPOCH_UNITS``). Read as seconds,
    milliseconds (RetailRocket, most event trackers) would put every event tens of thousands of
    years ahead and shrink the popularity windows a thousandfold.
    """
    a, unit = F.abs(d), F.lit(1.0)
    for smallest, per_second in reversed(EPOCH_UNITS):  # coarsest first: a finer unit's test overrides
        unit = F.when(a >= smallest, per_second).otherwise(unit)
    return F.when(~F.isnan(d), F.floor(d / unit).cast("long"))


@dataclass
class Flagged:
    """A table's distinct raw rows with multiplicity ``_n``, typed ``t__*`` columns, ``_rid`` and ``_reason``."""

    name: str
    frame: DataFrame
    raw_columns: list[str]
    typed_columns: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def accepted(self) -> DataFrame:
        """Typed accepted rows (one per distinct valid raw row), plus ``rid`` (a hash of the typed values)."""
        cols = [qcol(_T + c).alias(c) for c in self.typed_columns] + [F.col("_rid").alias("rid")]
        return self.frame.where(F.col("_reason").isNull()).select(*cols)

    def rejected(self) -> DataFrame:
        """Every rejected input row: raw columns as strings, ``table`` and ``reason``."""
        raw = [qcol(c).cast("string").alias(c) for c in self.raw_columns]
        meta = [F.lit(self.name).alias("table")]
        bad = self.frame.where(F.col("_reason").isNotNull()).select(
            *raw, *meta, F.col("_reason").alias("reason"), F.explode(F.sequence(F.lit(1), F.col("_n"))).alias("_k")
        )
        dup = self.frame.where(F.col("_reason").isNull() & (F.col("_n") > 1)).select(
            *raw,
            *meta,
            F.lit("duplicate").alias("reason"),
            F.explode(F.sequence(F.lit(1), F.col("_n") - 1)).alias("_k"),
        )
        return bad.unionByName(dup).drop("_k")

    def slimmed(self) -> DataFrame:
        """The frame with the raw columns kept only where :meth:`rejected` reads them (rejected or
        duplicated rows): the cached copy of a large table then holds its typed columns once."""
        keep = F.col("_reason").isNotNull() | (F.col("_n") > 1)
        return self.frame.withColumns({c: F.when(keep, qcol(c)) for c in self.raw_columns})

    def counts(self) -> dict[str, Any]:
        """``{"input", "accepted", "duplicates", "rejected": {reason: n}}`` (runs one small job)."""
        rows = (
            self.frame.groupBy("_reason")
            .agg(F.sum("_n").alias("n"), F.count(F.lit(1)).alias("distinct"))
            .collect()
        )
        out: dict[str, Any] = {"input": 0, "accepted": 0, "duplicates": 0, "rejected": {}}
        for r in rows:
            out["input"] += int(r["n"])
            if r["_reason"] is None:
                out["accepted"] = int(r["distinct"])
                out["duplicates"] = int(r["n"]) - int(r["distinct"])
            else:
                out["rejected"][r["_reason"]] = int(r["n"])
        if out["duplicates"]:
            out["rejected"]["duplicate"] = out["duplicates"]
        out["rejected"] = dict(sorted(out["rejected"].items()))
        return out


def _flag(
    name: str,
    df: DataFrame,
    typed: dict[str, Column],
    checks: list[tuple[str, Column]],
    key: list[str] | None = None,
    pre_join=None,
    cluster: str | None = None,
) -> Flagged:
    raw = list(df.columns)
    keys = [qcol(c) for c in raw]
    if cluster is not None:
        # Shuffled by the typed ``cluster`` column (a function of the raw row, so grouping by it
        # too changes no group): the duplicate GROUP BY needs no shuffle of its own, and the
        # output arrives partitioned by it for the per-user work downstream.
        df = df.withColumn(_T + cluster, typed[cluster]).repartition(_T + cluster)
        keys.insert(0, qcol(_T + cluster))
    g = df.groupBy(*keys).agg(F.count(F.lit(1)).alias("_n"))
    g = g.withColumns({_T + k: v for k, v in typed.items() if k != cluster})
    # a content hash of the typed values: a deterministic tie-breaker and seed that does not
    # depend on the file format (CSV "" and Parquet null, "10" and "10.00" hash alike)
    g = g.withColumn("_rid", F.xxhash64(*[qcol(_T + k) for k in typed]))
    if pre_join is not None:
        g = pre_join(g)
    reason = F.coalesce(*[F.when(bad, F.lit(r)) for r, bad in checks], F.lit(None).cast("string"))
    g = g.withColumn("_reason", reason)
    if key:
        w = Window.partitionBy(*[qcol(_T + k) for k in key], F.col("_reason").isNull()).orderBy("_rid")
        g = g.withColumn(
            "_reason",
            F.when(F.col("_reason").isNull() & (F.row_number().over(w) > 1), F.lit("duplicate_key")).otherwise(
                F.col("_reason")
            ),
        )
    drop = [c for c in g.columns if c.startswith("_known")]
    if drop:
        g = g.drop(*drop)
    return Flagged(name, g, raw, list(typed))


def _dtype(df: DataFrame, col: str) -> T.DataType:
    return df.schema[col].dataType


def has_timestamps(events: DataFrame) -> bool:
    """True when the events carry a timestamp column with at least one non-empty value."""
    if "timestamp" not in events.columns:
        return False
    present = _present(qcol("timestamp"), _dtype(events, "timestamp"))
    return bool(events.where(present).limit(1).count())


def flag_events(events: DataFrame, with_ts: bool, catalog_ids: DataFrame | None = None) -> Flagged:
    """Validate the events table.

    Args:
        events: raw events (contract columns, any extra columns are kept in rejected output).
        with_ts: whether the dataset has timestamps (see :func:`has_timestamps`).
        catalog_ids: one column ``product_id`` of known catalog ids, or None without a catalog.
    """
    cols = set(events.columns)
    c, dt = qcol, lambda n: _dtype(events, n)
    typed: dict[str, Column] = {
        "user_id": id_col(c("user_id"), dt("user_id")),
        "product_id": id_col(c("product_id"), dt("product_id")),
        "seller_id": id_col(c("seller_id"), dt("seller_id")) if "seller_id" in cols else F.lit(None).cast("string"),
    }
    checks: list[tuple[str, Column]] = [
        ("missing_user_id", qcol(_T + "user_id").isNull()),
        ("missing_product_id", qcol(_T + "product_id").isNull()),
    ]
    if "event_type" in cols:
        et = F.lower(F.trim(c("event_type").cast("string")))
        aliases = F.create_map(*[F.lit(x) for kv in EVENT_ALIASES.items() for x in kv])
        et = F.coalesce(aliases[F.regexp_replace(et, "[^a-z0-9]", "")], et)
        typed["event_type"] = F.when(et.isNull() | (et == ""), F.lit("purchase")).otherwise(et)
    else:
        typed["event_type"] = F.lit("purchase")
    checks.append(("unknown_event_type", ~qcol(_T + "event_type").isin(*EVENT_TYPES)))
    code = F.lit(None).cast("byte")
    for t, v in EVENT_CODE.items():
        code = F.when(qcol(_T + "event_type") == t, F.lit(v).cast("byte")).otherwise(code)
    if with_ts:
        ts, bad_ts = epoch_col(c("timestamp"), dt("timestamp"))
        typed["ts"] = ts
        checks.append(("missing_timestamp", ~_present(c("timestamp"), dt("timestamp"))))
        checks.append(("bad_timestamp", bad_ts))
    else:
        typed["ts"] = F.lit(0).cast("long")
    if "price" in cols:
        v, bad = num_col(c("price"), dt("price"))
        typed["price"] = v
        checks += [("bad_price", bad), ("negative_price", v < 0)]
    else:
        typed["price"] = F.lit(None).cast("double")
    # quantity is parsed but never a reason to reject (it is not used downstream)
    typed["quantity"] = num_col(c("quantity"), dt("quantity"))[0] if "quantity" in cols else F.lit(None).cast("double")
    if "split" in cols:
        sp = F.lower(F.trim(c("split").cast("string")))
        typed["split"] = sp
        checks.append(("bad_split", ~F.coalesce(sp.isin("train", "val", "test"), F.lit(False))))
    pre_join = None
    if catalog_ids is not None:
        ids = catalog_ids.select(F.col("product_id").alias("_known_pid")).distinct().withColumn("_known", F.lit(True))

        def pre_join(g: DataFrame) -> DataFrame:
            return g.join(ids, g[_T + "product_id"] == ids["_known_pid"], "left")

        checks.append(("unknown_product", F.col("_known").isNull()))
    fl = _flag("events", events, typed, checks, pre_join=pre_join, cluster="user_id")
    fl.frame = fl.frame.withColumn(_T + "event", code)
    fl.typed_columns.append("event")
    return fl


def catalog_product_ids(products: DataFrame) -> DataFrame:
    """Non-empty product ids of the raw catalog (column ``product_id``)."""
    pid = id_col(qcol("product_id"), _dtype(products, "product_id"))
    return products.select(pid.alias("product_id")).where(F.col("product_id").isNotNull())


def normalise_category(c: Column) -> Column:
    """``" a>b >  c "`` -> ``"a > b > c"``; null when empty."""
    parts = F.filter(F.transform(F.split(c.cast("string"), ">"), lambda x: F.trim(x)), lambda x: x != "")
    return F.when(F.size(parts) > 0, F.array_join(parts, " > "))


def _nonempty_str(c: Column) -> Column:
    s = F.trim(c.cast("string"))
    return F.when(s != "", s)


def _optional_number(df: DataFrame, name: str, typed: dict[str, Column], checks: list[tuple[str, Column]]) -> None:
    """Type an optional non-negative numeric column (null double when absent), flagging bad and negative values."""
    if name in df.columns:
        v, bad = num_col(qcol(name), _dtype(df, name))
        typed[name] = v
        checks += [(f"bad_{name}", bad), (f"negative_{name}", v < 0)]
    else:
        typed[name] = F.lit(None).cast("double")


def _optional_epoch(df: DataFrame, name: str, typed: dict[str, Column], checks: list[tuple[str, Column]]) -> None:
    """Type an optional timestamp column as epoch seconds (null long when absent), flagging unparsable values."""
    if name in df.columns:
        v, bad = epoch_col(qcol(name), _dtype(df, name))
        typed[name] = v
        checks.append(("bad_timestamp", bad))
    else:
        typed[name] = F.lit(None).cast("long")


def flag_products(products: DataFrame) -> Flagged:
    cols = set(products.columns)
    c, dt = qcol, lambda n: _dtype(products, n)
    typed: dict[str, Column] = {"product_id": id_col(c("product_id"), dt("product_id"))}
    checks: list[tuple[str, Column]] = [("missing_product_id", qcol(_T + "product_id").isNull())]
    typed["category"] = normalise_category(c("category")) if "category" in cols else F.lit(None).cast("string")
    typed["brand"] = _nonempty_str(c("brand")) if "brand" in cols else F.lit(None).cast("string")
    _optional_number(products, "price", typed, checks)
    _optional_epoch(products, "created_at", typed, checks)
    return _flag("products", products, typed, checks, key=["product_id"])


def flag_offers(offers: DataFrame) -> Flagged:
    c, dt = qcol, lambda n: _dtype(offers, n)
    typed: dict[str, Column] = {
        "product_id": id_col(c("product_id"), dt("product_id")),
        "seller_id": id_col(c("seller_id"), dt("seller_id")),
    }
    checks: list[tuple[str, Column]] = [
        ("missing_product_id", qcol(_T + "product_id").isNull()),
        ("missing_seller_id", qcol(_T + "seller_id").isNull()),
    ]
    for col in ("price", "stock", "shipping_days"):
        _optional_number(offers, col, typed, checks)
    return _flag("offers", offers, typed, checks, key=["product_id", "seller_id"])


def flag_sellers(sellers: DataFrame) -> Flagged:
    c, dt = qcol, lambda n: _dtype(sellers, n)
    typed: dict[str, Column] = {"seller_id": id_col(c("seller_id"), dt("seller_id"))}
    checks: list[tuple[str, Column]] = [("missing_seller_id", qcol(_T + "seller_id").isNull())]
    _optional_number(sellers, "rating", typed, checks)
    _optional_epoch(sellers, "created_at", typed, checks)
    return _flag("sellers", sellers, typed, checks, key=["seller_id"])


def flag_users(users: DataFrame) -> Flagged:
    c, dt = qcol, lambda n: _dtype(users, n)
    typed: dict[str, Column] = {"user_id": id_col(c("user_id"), dt("user_id"))}
    checks: list[tuple[str, Column]] = [("missing_user_id", qcol(_T + "user_id").isNull())]
    _optional_epoch(users, "signup_date", typed, checks)
    return _flag("users", users, typed, checks, key=["user_id"])


def validate_tables(
    tables: dict[str, DataFrame], with_ts: bool | None = None
) -> tuple[dict[str, Flagged], bool]:
    """Flag every table; returns ``({name: Flagged}, has_timestamps)``.

    ``with_ts`` None means: timestamps when the events have a ``timestamp`` column (no Spark job);
    :func:`all_timestamps_missing` tells afterwards whether that column was in fact empty.
    """
    if with_ts is None:
        with_ts = "timestamp" in tables["events"].columns
    out: dict[str, Flagged] = {}
    catalog_ids = catalog_product_ids(tables["products"]) if "products" in tables else None
    out["events"] = flag_events(tables["events"], with_ts, catalog_ids)
    makers = {"products": flag_products, "offers": flag_offers, "sellers": flag_sellers, "users": flag_users}
    for name, fn in makers.items():
        if name in tables:
            out[name] = fn(tables[name])
    return out, with_ts


def all_timestamps_missing(event_counts: dict) -> bool:
    """True when a timestamp column exists but no row has a value (every otherwise-valid row was
    rejected as ``missing_timestamp``): the data is then treated as having no timestamps."""
    return event_counts["accepted"] == 0 and event_counts["rejected"].get("missing_timestamp", 0) > 0
