"""LightGCN-format implicit feedback (e.g. the Gowalla split in ``../shared/datasets/gowalla``).

``train.txt`` and ``test.txt``: one line per user, ``user_id item_id item_id ...`` separated by
whitespace; a line may carry a user and no items. Read with Spark's text source + split/explode
(810k interactions in a few seconds).

Output (raw contract):

- ``events``: user_id, product_id (strings), event_type ``purchase``, split ``train`` | ``test``
  (and ``val`` for the last ``val_fraction`` of each train line when asked). The data has no
  clock (the prepare job's predefined split uses ``split``). The items of a line are in an order,
  though: on Gowalla consecutive items are closer than random pairs of the line and the end of the
  line is the closest to the user's test items (README), so the end of a line is the validation
  set that resembles test.txt (``data.val_carve: last``). With ``line_order`` the events carry
  that order as ``timestamp``: the item's position in its train line (1, 2, ...), test items
  after the user's train items (``data.timestamps: order``: an order, not a time).
- ``users``: every user id on any line, including users without items.
"""

from __future__ import annotations

import os

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from data_pipelines.splits import n_random, uniform

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


def read_lightgcn(
    spark, path: str, val_last_fraction: float = 0.0, seed: int = 17, line_order: bool = False
) -> dict[str, DataFrame]:
    """Read ``train.txt`` (required) and ``test.txt`` (optional) under ``path``.

    Args:
        val_last_fraction: mark this fraction of the end of each train line as ``val`` (stochastic
            rounding per user with ``seed``, as the split job's carve; at least one item stays train).
        line_order: give each event its position as an integer ``timestamp`` (train line positions
            from 1; a user's test items follow the last of their train items, in line order).
    """
    lines = None
    for split, name in SPLIT_FILES.items():
        f = os.path.join(path, name)
        if not os.path.exists(f):
            if split == "train":
                raise FileNotFoundError(f"LightGCN data needs {f}")
            continue
        df = _read_lines(spark, f, split)
        lines = df if lines is None else lines.unionByName(df)
    events = lines.select("user_id", "split", F.size("items").alias("_n"), F.posexplode("items").alias("_pos", "product_id"))
    if val_last_fraction > 0:
        # the split job's stochastic rounding, so a line yields as many val rows as its carve would
        n_val = F.least(n_random(F.col("_n"), val_last_fraction, uniform(seed, F.col("user_id"), F.lit("val"))), F.col("_n") - 1)
        is_val = (F.col("split") == "train") & (F.col("_pos") >= F.col("_n") - n_val)
        events = events.withColumn("split", F.when(is_val, F.lit("val")).otherwise(F.col("split")))
    cols = ["user_id", "product_id", F.lit("purchase").alias("event_type"), "split"]
    if line_order:
        n_train = lines.where(F.col("split") == "train").groupBy("user_id").agg(F.sum(F.size("items")).alias("_ntr"))
        events = events.join(n_train, "user_id", "left")
        after = F.when(F.col("split") == "test", F.coalesce(F.col("_ntr"), F.lit(0))).otherwise(F.lit(0))
        cols.append((after + F.col("_pos") + 1).cast("long").alias("timestamp"))
    events = events.select(*cols)
    users = lines.select("user_id").distinct()
    return {"events": events, "users": users}
