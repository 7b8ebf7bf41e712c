"""LightGCN-format implicit feedback (e.g. the Gowalla split in ``../shared/datasets/gowalla``).

``train.txt`` and ``test.txt``: one line per user, ``user_id item_id item_id ...`` separated by
whitespace; a line may carry a user and no items. Read with Spark's text source + split/explode
(810k interactions in a few seconds).

Output (raw contract):

- ``events``: user_id, product_id (strings), event_type ``purchase``, split ``train`` | ``test``. No
  timestamp: the data has none (the prepare job's predefined split uses ``split``).
- ``users``: every user id on any line, including users without items.
"""

from __future__ import annotations

import os

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

SPLIT_FILES = {"train": "train.txt", "test": "test.txt"}


def _read_lines(spark, file: str, split: str) -> DataFrame:
    toks = F.split(F.trim(F.col("value")), r"\s+")
    return (
        spark.read.text(file)
        .select(toks.alias("t"))
        .where(F.col("t")[0] != "")
        .select(F.col("t")[0].alias("user_id"), F.slice("t", 2, F.size("t") - 1).alias("items"))
        .withColumn("split", F.lit(split))
    )


def read_lightgcn(spark, path: str) -> dict[str, DataFrame]:
    """Read ``train.txt`` (required) and ``test.txt`` (optional) under ``path``."""
    lines = None
    for split, name in SPLIT_FILES.items():
        f = os.path.join(path, name)
        if not os.path.exists(f):
            if split == "train":
                raise FileNotFoundError(f"LightGCN data needs {f}")
            continue
        df = _read_lines(spark, f, split)
        lines = df if lines is None else lines.unionByName(df)
    events = lines.select(
        "user_id",
        F.explode("items").alias("product_id"),
        F.lit("purchase").alias("event_type"),
        "split",
    )
    users = lines.select("user_id").distinct()
    return {"events": events, "users": users}
