"""Vocabularies on tiny typed tables (``data_pipelines.vocab``), without the full pipeline."""

from __future__ import annotations

from pyspark.testing import assertDataFrameEqual

from data_pipelines.vocab import build_vocabs, id_counts, lookup
from recsys.config import DataConfig

EVENTS = [("u1", "p1", "s1"), ("u1", "p2", None), ("u2", "p1", "s1"), ("u2", "p1", "s2"), ("u3", "p3", "s1")]


def _events(spark):
    return spark.createDataFrame(EVENTS, "user_id string, product_id string, seller_id string")


def test_id_counts_counts_every_id_kind_in_one_pass_and_skips_null_ids(spark) -> None:
    want = spark.createDataFrame(
        [("user", "u1", 2), ("user", "u2", 2), ("user", "u3", 1),
         ("product", "p1", 3), ("product", "p2", 1), ("product", "p3", 1),
         ("seller", "s1", 3), ("seller", "s2", 1)],
        "kind string, id string, count long",
    )
    assertDataFrameEqual(id_counts(_events(spark)), want)


def test_vocabularies_rank_by_count_then_id_and_anchor_catalog_ids(spark) -> None:
    # p9: in the catalog only (cold start)
    products = spark.createDataFrame([("p1", "a > b", "x"), ("p9", "a", None)], "product_id string, category string, brand string")
    cached = []

    def cache(df):
        cached.append(df)
        return df.persist()

    v = build_vocabs(spark, _events(spark), products, None, None,
                     DataConfig(min_user_count=2, min_product_count=2), cache=cache)
    assert len(cached) == 1  # the shared id counts
    assertDataFrameEqual(v["users"], spark.createDataFrame([("u1", 1, 2), ("u2", 2, 2)], "id string, index int, count long"))
    # p2 and p3 are below min_product_count and not in the catalog; p9 is anchored with count 0
    assertDataFrameEqual(v["products"], spark.createDataFrame([("p1", 1, 3), ("p9", 2, 0)], "id string, index int, count long"))
    assertDataFrameEqual(v["sellers"], spark.createDataFrame([("s1", 1, 3), ("s2", 2, 1)], "id string, index int, count long"))
    assertDataFrameEqual(v["categories"], spark.createDataFrame([("a", 1, 2), ("a > b", 2, 1)], "id string, index int, count long"))
    assertDataFrameEqual(v["brands"], spark.createDataFrame([("x", 1, 1)], "id string, index int, count long"))
    for df in cached:
        df.unpersist()


def test_lookup_maps_unknown_and_null_ids_to_zero_broadcast_or_not(spark) -> None:
    vocab = spark.createDataFrame([("a", 1, 5), ("b", 2, 3)], "id string, index int, count long")
    df = spark.createDataFrame([("a",), ("b",), ("zz",), (None,)], "k string")
    want = spark.createDataFrame([("a", 1), ("b", 2), ("zz", 0), (None, 0)], "k string, idx int")
    for broadcast in (False, True):
        assertDataFrameEqual(lookup(df, "k", vocab, "idx", broadcast), want)
