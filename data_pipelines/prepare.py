"""The ``prepare`` stage: raw contract tables -> the prepared artifact (layout in :mod:`data_pipelines.schema`).

:func:`prepare_tables` is the pure DataFrame job (it runs a few small actions: counts, quantiles and
scaling maxima, and persists the intermediate frames it reuses); :func:`run` reads the raw tables
(unless given), writes every output under a temporary directory, and commits it atomically with a
manifest (:func:`recsys.artifacts.atomic_artifact`).

The examples and per-user histories are built in numpy inside the Spark tasks and written there
by pyarrow (:mod:`data_pipelines.user_events`, :mod:`data_pipelines.examples`,
:mod:`data_pipelines.histories`, :mod:`data_pipelines.part_files`); small tables are collected and
written by the driver. Every file has exactly ``data.rows_per_row_group`` rows per row group, the
exact schema and a deterministic name (``examples/<split>/part-00000.parquet``...; single-file
tables as ``NAME.parquet``), so a rerun on the same inputs gives byte-identical files.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from data_pipelines import examples as ex_mod
from data_pipelines import features as feat_mod
from data_pipelines import histories as hist_mod
from data_pipelines.io import (
    DataContractError,
    check_columns,
    input_checksums,
    normalise_columns,
    read_tables,
)
from data_pipelines.part_files import SplitLayout, target_schema, write_split, write_split_files
from data_pipelines.partitioning import hash_partitioned_by
from data_pipelines.schema import EVENT_CODE, SPLITS, VOCABS
from data_pipelines.splits import assign_splits, is_positive
from data_pipelines.user_events import SPLIT_CODE, user_events
from data_pipelines.validation import all_timestamps_missing, validate_tables
from data_pipelines.vocab import build_vocabs, lookup
from recsys.artifacts import atomic_artifact, read_manifest
from recsys.config import Config, DataConfig, SparkConfig, to_dict

VOCAB_ARROW_SCHEMA = pa.schema([("id", pa.string()), ("index", pa.int32()), ("count", pa.int64())])
OFFERS_ARROW_SCHEMA = pa.schema(
    [
        ("product_idx", pa.int32()),
        ("seller_idx", pa.int32()),
        ("price", pa.float32()),
        ("stock", pa.int32()),
        ("shipping_days", pa.float32()),
    ]
)
FREQ_ARROW_SCHEMA = pa.schema([("product_idx", pa.int32()), ("count", pa.float64()), ("logq", pa.float64())])

Progress = Callable[[str], None] | None


@dataclass
class PreparedFrames:
    """Everything ``prepare`` writes, as DataFrames, plus ``info`` for the manifest."""

    user_events: DataFrame  # user_events.user_events: each user's rows contiguous, users ascending
    example_spec: ex_mod.ExampleSpec  # turns the user events into examples as they are written
    history_specs: tuple[hist_mod.HistorySpec, ...]  # ... and into the history tables
    vocabs: dict[str, DataFrame]  # name -> id, index, count (small tables are sorted when written)
    product_features: DataFrame
    seller_features: DataFrame
    offers: DataFrame
    product_freq: DataFrame
    rejected: dict[str, DataFrame]  # table -> raw columns as strings + table + reason
    info: dict[str, Any] = field(default_factory=dict)
    persisted: list[DataFrame] = field(default_factory=list)

    def unpersist(self) -> None:
        for df in self.persisted:
            try:
                df.unpersist()
            except Exception:  # noqa: BLE001 - the session may be gone already
                pass
        self.persisted.clear()


def _say(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


def prepare_tables(
    spark: SparkSession,
    tables: dict[str, DataFrame],
    cfg: DataConfig,
    sources: dict[str, dict[str, Any]] | None = None,
    progress: Progress = None,
) -> PreparedFrames:
    """Validate, index, split and featurise raw contract tables.

    Args:
        spark: the session (only used for small helper frames).
        tables: contract tables by name (``events`` required); ``events`` may carry ``split``.
        cfg: the data config.
        sources: optional ``{name: {"path": ...}}`` for error messages.
        progress: optional callback taking a status line.

    Returns:
        :class:`PreparedFrames`; call ``unpersist()`` when done writing.

    Raises:
        DataContractError: a required column or the events table is missing.
        ValueError: the split method cannot be applied to this data.
    """
    persisted: list[DataFrame] = []
    try:
        return _prepare_tables(spark, tables, cfg, sources or {}, progress, persisted)
    except BaseException:
        PreparedFrames(None, None, (), {}, None, None, None, None, {}, persisted=persisted).unpersist()
        raise


def _prepare_tables(
    spark: SparkSession,
    tables: dict[str, DataFrame],
    cfg: DataConfig,
    sources: dict[str, dict[str, Any]],
    progress: Progress,
    persisted: list[DataFrame],
) -> PreparedFrames:
    t0 = time.time()
    timings: dict[str, float] = {}

    def keep(df: DataFrame, level=StorageLevel.MEMORY_AND_DISK) -> DataFrame:
        df = df.persist(level)
        persisted.append(df)
        return df

    if "events" not in tables:
        raise DataContractError("no events table given")
    tables = {k: normalise_columns(v) for k, v in tables.items() if v is not None}
    for name, df in tables.items():
        check_columns(name, df, sources.get(name, {}).get("path", "DataFrame"))

    # 1. validation -------------------------------------------------------------------------
    _say(progress, "validating raw tables")
    flagged, has_ts = validate_tables(tables)
    validation: dict[str, Any] = {}

    def count_events() -> None:
        fl = flagged["events"]
        # the cached copy keeps raw columns only where rejected rows need them
        fl.frame = fl.slimmed().persist(StorageLevel.MEMORY_AND_DISK)
        validation["events"] = fl.counts()

    count_events()
    if has_ts and all_timestamps_missing(validation["events"]):  # an all-empty timestamp column
        flagged["events"].frame.unpersist()
        flagged, has_ts = validate_tables(tables, with_ts=False)
        count_events()
    for name, fl in flagged.items():
        if name != "events":
            fl.frame = fl.frame.persist(StorageLevel.MEMORY_AND_DISK)
            validation[name] = fl.counts()
        persisted.append(fl.frame)  # kept until written: the rejected rows are read from it
    rejected = {name: fl.rejected() for name, fl in flagged.items()}
    acc = {name: fl.accepted() for name, fl in flagged.items()}
    timings["validate"] = time.time() - t0

    # 2. vocabularies -------------------------------------------------------------------------
    _say(progress, "building vocabularies")
    t = time.time()
    vocabs = build_vocabs(
        spark, acc["events"], acc.get("products"), acc.get("offers"), acc.get("sellers"), cfg, cache=keep
    )
    vocab_rows: dict[str, int] = {}
    for name in VOCABS:
        vocabs[name] = keep(vocabs[name])
        vocab_rows[name] = vocabs[name].count()  # materialises the cache the lookups read
    small = {name: n <= cfg.spark.broadcast_vocab_rows for name, n in vocab_rows.items()}
    timings["vocab"] = time.time() - t

    # 3. split + index ------------------------------------------------------------------------
    _say(progress, "assigning splits and indexing events")
    t = time.time()
    codes = dict(EVENT_CODE)
    positive_codes = list(ex_mod.positive_codes(cfg, codes))
    ev = lookup(acc["events"], "user_id", vocabs["users"], "user_idx", small["users"])
    ev = lookup(ev, "product_id", vocabs["products"], "product_idx", small["products"])
    ev = lookup(ev, "seller_id", vocabs["sellers"], "seller_idx", small["sellers"])
    # The events arrive shuffled by user (validation's duplicate GROUP BY is partitioned by the
    # typed user id) and broadcast joins keep that: the per-user windows of the split and the
    # example and history builders, which need all of a user's events in one partition, reuse it.
    # A sort-merge join on the way (a vocabulary above data.spark.broadcast_vocab_rows, a large
    # catalog in validation's unknown-product check) moves them by its key: the plan says so, and
    # they are shuffled by user once more.
    if not hash_partitioned_by(ev, "user_id"):
        ev = ev.repartition("user_idx")
    ev, split_info = assign_splits(
        ev, cfg, has_ts, positive_codes, by=("user_idx", "user_id"), cutoff_events=acc["events"]
    )
    if "fallback" in split_info:
        _say(progress, split_info["fallback"])
    # cached in (user_idx, ts, rid) order: each user's events reach the example and history
    # builders contiguous and in time order
    ev = ev.select("user_idx", "product_idx", "seller_idx", "event", "ts", "price", "rid", "split")
    ev = keep(ev.sortWithinPartitions("user_idx", "ts", "rid"))
    is_pos = is_positive(positive_codes)
    stats = (
        ev.groupBy("split")
        .agg(
            F.count(F.lit(1)).alias("n"),
            F.max("ts").alias("max_ts"),
            F.sum((is_pos & (F.col("user_idx") == 0)).cast("long")).alias("unknown_user"),
            F.sum((is_pos & (F.col("user_idx") > 0) & (F.col("product_idx") == 0)).cast("long")).alias(
                "unknown_product"
            ),
        )
        .collect()
    )
    by_split = {r["split"]: r for r in stats}
    events_by_split = {s: int(by_split[s]["n"]) if s in by_split else 0 for s in SPLITS}
    cutoff = None
    if has_ts and "train" in by_split and by_split["train"]["max_ts"] is not None:
        cutoff = int(by_split["train"]["max_ts"])
    split_info["train_cutoff"] = cutoff
    drop_counts = (
        sum(int(r["unknown_user"] or 0) for r in stats),
        sum(int(r["unknown_product"] or 0) for r in stats),
    )
    train_ev = ev.where(F.col("split") == "train")
    pos_all = ex_mod.positives(ev, cfg, codes)
    timings["split"] = time.time() - t

    # 4. examples and histories (built in numpy as they are written) ----------------------------
    # Rows are hash-partitioned by user (user_id, or user_idx after a second shuffle) and ordered
    # by (user_idx, ts, rid) within partitions: a deterministic order without the sampling job and
    # shuffle of a global sort.
    events = user_events(ev, has_ts, cfg.seed)
    example_spec = ex_mod.ExampleSpec.from_config(cfg, has_ts, codes)
    history_specs = (
        hist_mod.HistorySpec("train", SPLIT_CODE["train"], 4 * int(cfg.max_history)),
        hist_mod.HistorySpec("full", None, hist_mod.FULL_HISTORY_CAP),
    )

    # 5. offers and features (train events only) ----------------------------------------------
    _say(progress, "computing features")
    t = time.time()
    if "offers" in acc:
        offers = keep(feat_mod.index_offers(acc["offers"], vocabs))
        feat_offers = offers
        offers_source = "offers table"
    else:
        offers = keep(feat_mod.offers_from_events(ev))
        feat_offers = keep(feat_mod.offers_from_events(train_ev))
        offers_source = "derived from events (product, seller) pairs"
    # order-only timestamps (data.timestamps=order) are no clock: no windows or ages from them
    clock_cutoff = cutoff if cfg.timestamps == "time" else None
    pfeat, pinfo = feat_mod.product_features(
        vocabs, acc.get("products"), feat_offers, train_ev, cfg, clock_cutoff, codes
    )
    persisted.extend(pinfo.pop("persisted"))
    sfeat, sinfo = feat_mod.seller_features(vocabs, acc.get("sellers"), feat_offers, train_ev, clock_cutoff, codes)
    persisted.extend(sinfo.pop("persisted"))
    train_pos = pos_all.where(
        (F.col("split") == "train") & (F.col("user_idx") > 0) & (F.col("product_idx") > 0)
    )
    freq = feat_mod.product_freq(vocabs, train_pos)
    timings["features"] = time.time() - t

    notes = []
    if not has_ts:
        notes.append("no timestamps: temporal splits and temporal features (popularity windows, age, hour/dow) unavailable")
    elif cfg.timestamps == "order":
        notes.append("order-only timestamps (data.timestamps=order): no temporal split, popularity windows, ages or hour/dow")
    info = {
        "has_timestamps": has_ts,
        "validation": validation,
        "rejected": {n: v["rejected"] for n, v in validation.items()},
        "split": split_info,
        "events_by_split": events_by_split,
        "dropped_positives": {"unknown_user": int(drop_counts[0] or 0), "unknown_product": int(drop_counts[1] or 0)},
        "offers_source": offers_source,
        "features": {
            "product_features": pinfo["features"],
            "product_scales": pinfo["scales"],
            "seller_features": sinfo["features"],
            "seller_scales": sinfo["scales"],
            "seller_mean_rating": sinfo["mean_rating"],
            "train_cutoff": clock_cutoff,
            "computed_from": "train split events only",
        },
        "timings_s": timings,
        "notes": notes,
    }
    return PreparedFrames(
        user_events=events,
        example_spec=example_spec,
        history_specs=history_specs,
        vocabs=vocabs,
        product_features=pfeat,
        seller_features=sfeat,
        offers=offers,
        product_freq=freq,
        rejected=rejected,
        info=info,
        persisted=persisted,
    )


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def collect_arrow(df: DataFrame) -> pa.Table:
    """A small DataFrame as an Arrow table (one collect job, no files)."""
    from pyspark.sql.pandas.types import to_arrow_schema

    batches = df._collect_as_arrow()
    if not batches:
        return to_arrow_schema(df.schema).empty_table()
    return pa.Table.from_batches(batches)


def write_small(
    df: DataFrame, root: Path, rel: str, rows_per_group: int, sort_by: list[str], target: pa.Schema | None = None
) -> dict[str, Any]:
    """Collect a small table, sort it, and write ``root/rel`` as one Parquet file."""
    tbl = collect_arrow(df)
    if sort_by and tbl.num_rows:
        tbl = tbl.sort_by([(c, "ascending") for c in sort_by])
    tbl = tbl.cast(target_schema(tbl.schema, target))
    dst = root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(tbl, dst, row_group_size=max(int(rows_per_group), 1), compression="snappy")
    return {"rows": tbl.num_rows, "schema": tbl.schema.to_string(show_schema_metadata=False), "files": [rel]}


def _write_all(pf: PreparedFrames, root: Path, rows_per_group: int, progress: Progress) -> dict[str, Any]:
    outputs: dict[str, Any] = {}
    rg = rows_per_group
    for name, df in pf.vocabs.items():
        outputs[f"vocab/{name}.parquet"] = write_small(df, root, f"vocab/{name}.parquet", rg, ["index"], VOCAB_ARROW_SCHEMA)
    _say(progress, "writing examples")
    layout = SplitLayout("split", SPLITS, ("user_idx", "ts", "rid"), ("rid",), rg, ex_mod.EXAMPLE_ARROW_SCHEMA, ex_mod.EXAMPLE_DICTIONARY)
    written = write_split(pf.user_events, root, "examples", layout, ex_mod.example_batches(pf.example_spec))
    for split in SPLITS:
        outputs[f"examples/{split}"] = written[split]
    _say(progress, "writing features and histories")
    small = [
        ("features/products.parquet", pf.product_features, ["product_idx"], None),
        ("features/sellers.parquet", pf.seller_features, ["seller_idx"], None),
        ("features/offers.parquet", pf.offers, ["product_idx", "seller_idx"], OFFERS_ARROW_SCHEMA),
        ("features/product_freq.parquet", pf.product_freq, ["product_idx"], FREQ_ARROW_SCHEMA),
    ]
    for rel, df, key, target in small:
        outputs[rel] = write_small(df, root, rel, rg, key, target)
    names = tuple(h.name for h in pf.history_specs)
    layout = SplitLayout("history", names, ("user_idx",), (), rg, hist_mod.HISTORY_ARROW_SCHEMA)
    transform = hist_mod.history_batches(pf.history_specs, pf.example_spec.has_ts)
    rels = {name: f"histories/{name}.parquet" for name in names}
    for name, info in write_split_files(pf.user_events, root, rels, layout, transform).items():
        outputs[rels[name]] = info
    for name, df in pf.rejected.items():
        key = ["reason", *[c for c in df.columns if c not in ("reason", "table")]]
        outputs[f"rejected/{name}.parquet"] = write_small(df, root, f"rejected/{name}.parquet", rg, key)
    shutil.rmtree(root / "_spark", ignore_errors=True)
    return outputs


def prepare_conf(spark_cfg: SparkConfig) -> dict[str, str]:
    """Session settings for the prepare job unless ``data.spark.extra`` sets them.

    Adaptive query execution is off: the job is ~40 mostly small shuffles, and AQE's per-stage
    re-planning cost more than it saved (measured ~1.7x slower end to end on small and medium
    data with local[*]); ``spark.sql.shuffle.partitions`` then sizes every shuffle.

    The cached intermediate frames are stored uncompressed: compressing the in-memory column
    batches cost more CPU than the whole validation pass (10M events: persist + count 49 s
    compressed, 23 s uncompressed, 2 cores); the frames live only for this job, and spill to disk
    when memory runs short.
    """
    defaults = {"spark.sql.adaptive.enabled": "false", "spark.sql.inMemoryColumnarStorage.compressed": "false"}
    return {k: spark_cfg.extra.get(k, v) for k, v in defaults.items()}


@contextlib.contextmanager
def sql_conf(spark: SparkSession, conf: dict[str, str]):
    """Set runtime SQL settings for the duration of the block, then restore them."""
    old = {k: spark.conf.get(k, None) for k in conf}
    try:
        for k, v in conf.items():
            spark.conf.set(k, v)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)


def run(
    cfg: Config,
    data_dir: str,
    out_dir: str,
    tables: dict[str, DataFrame] | None = None,
    progress: Progress = None,
) -> dict[str, Any]:
    """Run the prepare stage and commit ``out_dir`` atomically.

    Args:
        cfg: the full config (``cfg.data`` drives the job, ``cfg.data.spark`` the session).
        data_dir: the raw contract directory or URI (ignored for reading when ``tables`` is given,
            still recorded in the manifest).
        out_dir: the prepared artifact directory (local path) to create or replace.
        tables: contract tables as DataFrames (source adapters), instead of reading ``data_dir``.
        progress: optional callback taking a status line.

    Returns:
        The manifest as written (with file checksums).
    """
    from data_pipelines.spark_session import get_spark

    t0 = time.time()
    spark = get_spark(cfg.data.spark)
    if tables is None:
        _say(progress, f"reading raw tables from {data_dir}")
        tables, sources = read_tables(spark, data_dir)
    else:
        sources = {name: {"format": "dataframe"} for name in tables}
    manifest: dict[str, Any] = {
        "stage": "prepare",
        "config": to_dict(cfg),
        "data_dir": str(data_dir),
        "inputs": input_checksums(spark, sources),
    }
    pf: PreparedFrames | None = None
    try:
        with sql_conf(spark, prepare_conf(cfg.data.spark)), atomic_artifact(out_dir, manifest) as tmp:
            pf = prepare_tables(spark, tables, cfg.data, sources, progress)
            t = time.time()
            outputs = _write_all(pf, Path(tmp), cfg.data.rows_per_row_group, progress)
            info = dict(pf.info)
            info["timings_s"] = {**info["timings_s"], "write": time.time() - t, "total": time.time() - t0}
            info["vocab_sizes"] = {v: outputs[f"vocab/{v}.parquet"]["rows"] + 1 for v in VOCABS}
            info.update({f"n_{k}": n for k, n in info["vocab_sizes"].items()})
            manifest.update(info)
            manifest["outputs"] = outputs
            manifest["schemas"] = {k: v["schema"] for k, v in outputs.items()}
            manifest["rows"] = {
                "events_accepted": info["validation"]["events"]["accepted"],
                "events_by_split": info["events_by_split"],
                "examples": {s: outputs[f"examples/{s}"]["rows"] for s in SPLITS},
                **{k: v["rows"] for k, v in outputs.items() if not k.startswith("examples/")},
            }
            _say(progress, "committing")
    finally:
        if pf is not None:
            pf.unpersist()
    return read_manifest(out_dir)
