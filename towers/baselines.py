"""Baselines scored by the same full-ranking code: most-popular and Spark MLlib ALS (implicit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recsys.config import EvalConfig, SparkConfig
from towers.eval_data import read_examples


def train_counts(prepared: str | Path, n_products: int, n_sellers: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted training counts per product and per seller. Returns ([N], [S]) float64."""
    t = read_examples(Path(prepared) / "examples" / "train", ["product_idx", "seller_idx", "weight"])
    w = np.asarray(t["weight"], dtype=np.float64)
    p = np.bincount(np.asarray(t["product_idx"], dtype=np.int64), weights=w, minlength=n_products)[:n_products]
    s = np.bincount(np.asarray(t["seller_idx"], dtype=np.int64), weights=w, minlength=n_sellers)[:n_sellers]
    s[0] = 0.0
    return p, s


def popularity_vectors(counts: np.ndarray, n_users: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Express most-popular as inner products: every user is [1], item j is [log1p(count_j)]."""
    items = torch.from_numpy(np.log1p(counts).astype(np.float32)).unsqueeze(1)
    users = torch.ones(n_users, 1)
    return users, items


def als_factors(
    prepared: str | Path,
    column: str,
    n_items: int,
    n_users: int,
    cfg: EvalConfig,
    spark_cfg: SparkConfig,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit Spark MLlib ALS with implicit feedback on training (user, ``column``) weights.

    Args:
        column: "product_idx" or "seller_idx".

    Returns:
        (user factors [n_users, r], item factors [n_items, r]) float32; rows without data are 0.
    """
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import functions as F

    from data_pipelines.spark_session import get_spark

    spark = get_spark(spark_cfg)
    df = spark.read.parquet(str(Path(prepared) / "examples" / "train"))
    df = df.where(F.col(column) > 0).groupBy("user_idx", column).agg(F.sum("weight").alias("rating"))
    als = ALS(
        rank=cfg.als_rank,
        maxIter=cfg.als_iterations,
        regParam=cfg.als_reg,
        alpha=cfg.als_alpha,
        implicitPrefs=True,
        userCol="user_idx",
        itemCol=column,
        ratingCol="rating",
        seed=seed,
        coldStartStrategy="drop",
    )
    model = als.fit(df)
    uf = np.zeros((n_users, cfg.als_rank), np.float32)
    itf = np.zeros((n_items, cfg.als_rank), np.float32)
    for frame, out in ((model.userFactors, uf), (model.itemFactors, itf)):
        pdf = frame.toPandas()
        if len(pdf):
            ids = pdf["id"].to_numpy()
            out[ids] = np.stack(pdf["features"].to_numpy()).astype(np.float32)
    return uf, itf
