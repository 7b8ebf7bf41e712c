"""Vocabularies: string id -> int32 index, 0 reserved for unknown / below min-frequency.

Deterministic across reruns: indexes follow ``count desc, id asc``. Counts are accepted events
(all event types). Products and sellers listed in the catalog tables or in offers always get an
index (cold-start items must be indexable); the min-frequency thresholds apply to ids seen only in
events. Categories are every prefix of the ``a > b > c`` path (``a``, ``a > b``, ``a > b > c``),
counted in catalog products, like brands.
"""

from __future__ import annotations

from collections.abc import Callable

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys.config import DataConfig

VOCAB_SCHEMA = T.StructType(
    [
        T.StructField("id", T.StringType()),
        T.StructField("index", T.IntegerType()),
        T.StructField("count", T.LongType()),
    ]
)


def rank(counts: DataFrame) -> DataFrame:
    """``(id, count)`` -> ``(id, index, count)`` with index 1..N by count desc, id asc.

    One partition does the numbering (vocabularies are small next to events); partitioning by a
    constant keeps Spark from warning about a window without partitions.
    """
    w = Window.partitionBy(F.lit(0)).orderBy(F.desc("count"), F.asc("id"))
    return counts.select(
        F.col("id").cast("string").alias("id"),
        F.row_number().over(w).cast("int").alias("index"),
        F.col("count").cast("long").alias("count"),
    )


def _with_anchors(event_counts: DataFrame, anchors: list[DataFrame], min_count: int) -> DataFrame:
    """Event counts plus anchored ids (count 0 when no events); event-only ids need ``min_count``."""
    counts = event_counts.withColumn("_anchor", F.lit(False))
    for a in anchors:
        counts = counts.unionByName(
            a.select(F.col("id"), F.lit(0).cast("long").alias("count"), F.lit(True).alias("_anchor"))
        )
    agg = counts.where(F.col("id").isNotNull()).groupBy("id").agg(
        F.sum("count").alias("count"), F.max(F.col("_anchor").cast("int")).alias("_anchor")
    )
    return agg.where((F.col("_anchor") == 1) | (F.col("count") >= max(int(min_count), 1))).drop("_anchor")


def category_prefixes(category: F.Column) -> F.Column:
    """``"a > b > c"`` -> ``["a", "a > b", "a > b > c"]`` (null -> empty array)."""
    parts = F.split(F.coalesce(category, F.lit("")), " > ")
    parts = F.filter(parts, lambda x: x != "")
    prefixes = F.transform(F.sequence(F.lit(1), F.size(parts)), lambda i: F.array_join(F.slice(parts, 1, i), " > "))
    return F.when(F.size(parts) > 0, prefixes).otherwise(F.array().cast("array<string>"))


def id_counts(events: DataFrame) -> DataFrame:
    """``(kind, id, count)``: events per user, product and seller id (kind ``user|product|seller``), null ids left out.

    One pass over the events for all three (three separate aggregations would scan them three
    times); persist the result when it is read more than once.
    """
    ids = F.explode(
        F.array(
            *[
                F.struct(F.lit(kind).alias("kind"), F.col(col).cast("string").alias("id"))
                for kind, col in (("user", "user_id"), ("product", "product_id"), ("seller", "seller_id"))
            ]
        )
    )
    x = events.select(ids.alias("_x")).select("_x.kind", "_x.id").where(F.col("id").isNotNull())
    return x.groupBy("kind", "id").agg(F.count(F.lit(1)).alias("count"))


def empty_vocab(spark: SparkSession) -> DataFrame:
    return spark.createDataFrame([], VOCAB_SCHEMA)


def build_vocabs(
    spark: SparkSession,
    events: DataFrame,
    products: DataFrame | None,
    offers: DataFrame | None,
    sellers: DataFrame | None,
    cfg: DataConfig,
    cache: Callable[[DataFrame], DataFrame] | None = None,
) -> dict[str, DataFrame]:
    """Build the five vocabularies from typed accepted tables (see :mod:`data_pipelines.validation`).

    ``cache`` persists the event id counts the user, product and seller vocabularies share (the
    caller unpersists them); without it they are recomputed for each.

    Returns:
        ``{"users", "products", "sellers", "categories", "brands"}`` -> ``(id, index, count)``.
    """
    out: dict[str, DataFrame] = {}
    counts = id_counts(events)
    if cache is not None:
        counts = cache(counts)
    uc = counts.where(F.col("kind") == "user").drop("kind")
    out["users"] = rank(uc.where(F.col("count") >= max(int(cfg.min_user_count), 1)))

    pc = counts.where(F.col("kind") == "product").drop("kind")
    p_anchor = []
    if products is not None:
        p_anchor.append(products.select(F.col("product_id").alias("id")))
    if offers is not None:
        p_anchor.append(offers.select(F.col("product_id").alias("id")))
    out["products"] = rank(_with_anchors(pc, p_anchor, cfg.min_product_count))

    sc = counts.where(F.col("kind") == "seller").drop("kind")
    s_anchor = []
    if sellers is not None:
        s_anchor.append(sellers.select(F.col("seller_id").alias("id")))
    if offers is not None:
        s_anchor.append(offers.select(F.col("seller_id").alias("id")))
    out["sellers"] = rank(_with_anchors(sc, s_anchor, cfg.min_seller_count))

    if products is not None:
        cats = products.select(F.explode(category_prefixes(F.col("category"))).alias("id"))
        out["categories"] = rank(cats.groupBy("id").agg(F.count(F.lit(1)).alias("count")))
        brands = products.where(F.col("brand").isNotNull()).select(F.col("brand").alias("id"))
        out["brands"] = rank(brands.groupBy("id").agg(F.count(F.lit(1)).alias("count")))
    else:
        out["categories"] = empty_vocab(spark)
        out["brands"] = empty_vocab(spark)
    return out


def lookup(df: DataFrame, on: str, vocab: DataFrame, out: str, broadcast: bool = False) -> DataFrame:
    """Add ``out`` = the vocab index of column ``on`` (0 when null or not in the vocabulary).

    ``broadcast`` ships the vocabulary to every task instead of shuffling ``df`` by ``on`` (the
    planner cannot tell on its own: a persisted vocabulary's size estimate is its input's).
    """
    v = vocab.select(F.col("id").alias("_vid"), F.col("index").alias("_vidx"))
    if broadcast:
        v = F.broadcast(v)
    j = df.join(v, df[on] == v["_vid"], "left")
    return j.withColumn(out, F.coalesce(F.col("_vidx"), F.lit(0)).cast("int")).drop("_vid", "_vidx")
