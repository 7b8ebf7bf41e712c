"""Product, seller and offer features, computed only from train-split events (no leakage).

Static tables (products catalog, offers, sellers) are snapshots and used as they are; everything
derived from behaviour (popularity, sales, first-seen dates, event prices) reads train events only,
and ``cutoff`` is the last train event's time.

``features/products.parquet`` has one row per product index 0..N (row 0 = unknown, all zeros):
``cat_l1..cat_l3``, ``brand_idx`` (int32 indexes, 0 unknown), the scaled numeric
:data:`~data_pipelines.schema.PRODUCT_FEATURES` (float32, roughly [0, 1]: each is divided by its max
over real products, recorded in the manifest as ``feature_scales``), and raw values (``raw_*``,
``price_band_idx`` 0 unknown / 1..price_bands).

- price: catalog price, else the median offer price, else the median train event price;
  ``log_price`` = log1p(price); ``price_band`` = quantile band of the price within the level-1
  category (1..price_bands, 0 unknown) divided by price_bands.
- ``log_pop_{d}d`` / ``log_pop_all``: log1p of the event-weighted train events in the ``d`` days
  up to the cutoff / in all train time (windows from ``data.popularity_windows_days``).
- ``n_sellers``: log1p(distinct sellers offering it); ``log_min_offer_price``: log1p(min offer price).
- ``age_days``: days from the catalog ``created_at`` (else the first train event) to the cutoff.

``features/sellers.parquet``: ``rating`` (missing -> mean rating), ``log_catalog_size``
(log1p #offers), ``log_sales`` (log1p #train purchases), ``price_competitiveness`` (mean over its
offers of offer price / min price for that product: 1 = always the cheapest, left unscaled),
``age_days`` (created_at, else first train event).

Without an offers table, offers are derived from events that carry a seller (price = median event
price, stock and shipping unknown): from all events for ``features/offers.parquet`` (what serving
can show), from train events for the features.
"""

from __future__ import annotations

from typing import Any

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from data_pipelines.examples import event_weight
from data_pipelines.vocab import category_prefixes, lookup
from recsys.config import DataConfig

DAY = 86400
LOGQ_FLOOR_FRACTION = 0.5  # zero-count products get logq of half the smallest positive count


def pop_feature_names(cfg: DataConfig) -> list[str]:
    return [f"log_pop_{int(d)}d" for d in cfg.popularity_windows_days] + ["log_pop_all"]


def product_feature_names(cfg: DataConfig) -> list[str]:
    return ["log_price", "price_band", *pop_feature_names(cfg), "n_sellers", "log_min_offer_price", "age_days"]


SELLER_FEATURE_NAMES = ["rating", "log_catalog_size", "log_sales", "price_competitiveness", "age_days"]


def index_offers(offers: DataFrame, vocabs: dict[str, DataFrame]) -> DataFrame:
    """Typed accepted offers -> product_idx, seller_idx, price, stock, shipping_days (-1 unknown)."""
    o = lookup(offers, "product_id", vocabs["products"], "product_idx")
    o = lookup(o, "seller_id", vocabs["sellers"], "seller_idx")
    return o.where((F.col("product_idx") > 0) & (F.col("seller_idx") > 0)).select(
        "product_idx",
        "seller_idx",
        F.coalesce(F.col("price"), F.lit(-1.0)).cast("float").alias("price"),
        F.coalesce(F.floor("stock"), F.lit(-1)).cast("int").alias("stock"),
        F.coalesce(F.col("shipping_days"), F.lit(-1.0)).cast("float").alias("shipping_days"),
    )


def offers_from_events(ev: DataFrame) -> DataFrame:
    """Implicit offers: every (product, seller) pair in the events, at the median event price."""
    return (
        ev.where((F.col("product_idx") > 0) & (F.col("seller_idx") > 0))
        .groupBy("product_idx", "seller_idx")
        .agg(F.median("price").alias("price"))
        .select(
            F.col("product_idx").cast("int"),
            F.col("seller_idx").cast("int"),
            F.coalesce(F.col("price"), F.lit(-1.0)).cast("float").alias("price"),
            F.lit(-1).cast("int").alias("stock"),
            F.lit(-1.0).cast("float").alias("shipping_days"),
        )
    )


def _index_frame(vocab: DataFrame, name: str) -> DataFrame:
    spark = vocab.sparkSession
    zero = spark.createDataFrame([(0,)], f"{name} int")
    return zero.unionByName(vocab.select(F.col("index").cast("int").alias(name)))


def _scale(
    df: DataFrame, raw: dict[str, str], key: str, extra: list[F.Column] | None = None
) -> tuple[DataFrame, dict[str, float], dict[str, Any]]:
    """Divide each raw column by its max over rows with ``key`` > 0 (one small job).

    Returns the frame with the scaled columns added, the scales, and the ``extra`` aggregates."""
    aggs = [F.max(F.col(c)).alias(name) for name, c in raw.items()] + list(extra or [])
    row = df.where(F.col(key) > 0).agg(*aggs).collect()[0].asDict()
    scales: dict[str, float] = {}
    cols = {}
    for name, c in raw.items():
        m = row.get(name)
        scales[name] = float(m) if m is not None and m > 0 else 1.0
        cols[name] = (F.coalesce(F.col(c), F.lit(0.0)) / scales[name]).cast("float")
    return df.withColumns(cols), scales, {k: v for k, v in row.items() if k not in raw}


def product_features(
    vocabs: dict[str, DataFrame],
    products: DataFrame | None,
    feat_offers: DataFrame,
    train_ev: DataFrame,
    cfg: DataConfig,
    cutoff: int | None,
    event_codes: dict[str, int],
) -> tuple[DataFrame, dict[str, Any]]:
    """One row per product index (0..N); see the module docstring.

    Returns ``(frame, info)``; ``info["persisted"]`` lists the frames cached here (runs two small jobs).
    """
    base = _index_frame(vocabs["products"], "product_idx")
    if products is not None:
        pv = vocabs["products"].select(F.col("id").alias("product_id"), F.col("index").alias("product_idx"))
        pre = category_prefixes(F.col("category"))
        cat = products.select(
            "product_id",
            *[F.when(F.size(pre) >= lvl, F.element_at(pre, lvl)).alias(f"_c{lvl}") for lvl in (1, 2, 3)],
            "brand",
            F.col("price").alias("catalog_price"),
            "created_at",
        )
        for lvl in (1, 2, 3):
            cat = lookup(cat, f"_c{lvl}", vocabs["categories"], f"cat_l{lvl}")
        cat = lookup(cat, "brand", vocabs["brands"], "brand_idx")
        cat = cat.join(pv, "product_id").select(
            "product_idx", "cat_l1", "cat_l2", "cat_l3", "brand_idx", "catalog_price", "created_at"
        )
        base = base.join(cat, "product_idx", "left")
    else:
        base = base.select(
            "product_idx",
            *[F.lit(0).alias(c) for c in ("cat_l1", "cat_l2", "cat_l3", "brand_idx")],
            F.lit(None).cast("double").alias("catalog_price"),
            F.lit(None).cast("long").alias("created_at"),
        )

    priced_price = F.when(F.col("price") >= 0, F.col("price"))
    off = feat_offers.groupBy("product_idx").agg(
        F.countDistinct("seller_idx").alias("_n_sellers"),
        F.median(priced_price).alias("_med_offer"),
        F.min(priced_price).alias("_min_offer"),
    )
    w = event_weight(cfg, event_codes)
    aggs = [F.sum(w).alias("_pop_all"), F.min("ts").alias("_first_ts")]
    for d in cfg.popularity_windows_days:
        if cutoff is not None:
            inwin = F.col("ts") > F.lit(int(cutoff) - int(d) * DAY)
            aggs.append(F.sum(F.when(inwin, w).otherwise(0.0)).alias(f"_pop_{int(d)}"))
        else:
            aggs.append(F.lit(0.0).alias(f"_pop_{int(d)}"))
    evs = train_ev.where(F.col("product_idx") > 0).groupBy("product_idx").agg(*aggs)
    base = base.join(off, "product_idx", "left").join(evs, "product_idx", "left").persist()
    persisted = [base]
    # The median train-event price is only a fallback, for products with neither a catalog nor an
    # offer price: an exact median holds every price of its group, so it is computed for those only.
    missing = base.where(
        F.col("catalog_price").isNull() & F.col("_med_offer").isNull() & (F.col("product_idx") > 0)
    ).select("product_idx")
    n_missing = missing.count()
    if n_missing:
        missing = F.broadcast(missing) if n_missing <= cfg.spark.broadcast_vocab_rows else missing
        med = (
            train_ev.join(missing, "product_idx", "left_semi")
            .groupBy("product_idx")
            .agg(F.median("price").alias("_med_event"))
        )
        base = base.join(med, "product_idx", "left")
    else:
        base = base.withColumn("_med_event", F.lit(None).cast("double"))

    price = F.coalesce(F.col("catalog_price"), F.col("_med_offer"), F.col("_med_event"))
    band_w = Window.partitionBy(F.coalesce(F.col("cat_l1"), F.lit(0)), price.isNull()).orderBy(price, "product_idx")
    if cutoff is not None:
        born = F.coalesce(F.col("created_at"), F.col("_first_ts"))
        age = F.greatest((F.lit(int(cutoff)) - born) / float(DAY), F.lit(0.0))
    else:
        age = F.lit(0.0)
    n_sellers = F.coalesce(F.col("_n_sellers"), F.lit(0))
    pop_all = F.coalesce(F.col("_pop_all"), F.lit(0.0))
    base = base.select(
        "*",
        price.alias("raw_price"),
        F.when(price.isNotNull() & (F.col("product_idx") > 0), F.ntile(int(cfg.price_bands)).over(band_w))
        .otherwise(0)
        .alias("price_band_idx"),
        F.coalesce(age, F.lit(0.0)).alias("raw_age_days"),
        n_sellers.alias("raw_n_sellers"),
        F.col("_min_offer").alias("raw_min_offer_price"),
        pop_all.alias("raw_pop_all"),
        F.log1p(price).alias("_log_price"),
        F.log1p(n_sellers).alias("_n_sellers_log"),
        F.log1p(F.col("_min_offer")).alias("_log_min_offer"),
        F.log1p(pop_all).alias("_log_pop_all"),
        *[
            F.log1p(F.coalesce(F.col(f"_pop_{int(d)}"), F.lit(0.0))).alias(f"_log_pop_{int(d)}")
            for d in cfg.popularity_windows_days
        ],
    )
    raw = {"log_price": "_log_price"}
    raw.update({f"log_pop_{int(d)}d": f"_log_pop_{int(d)}" for d in cfg.popularity_windows_days})
    raw.update(
        {
            "log_pop_all": "_log_pop_all",
            "n_sellers": "_n_sellers_log",
            "log_min_offer_price": "_log_min_offer",
            "age_days": "raw_age_days",
        }
    )
    base = base.persist()
    persisted.append(base)
    base, scales, _ = _scale(base, raw, "product_idx")
    base = base.withColumn("price_band", (F.col("price_band_idx") / float(cfg.price_bands)).cast("float"))
    scales["price_band"] = float(cfg.price_bands)
    names = product_feature_names(cfg)
    out = base.select(
        F.col("product_idx").cast("int"),
        *[F.coalesce(F.col(c), F.lit(0)).cast("int").alias(c) for c in ("cat_l1", "cat_l2", "cat_l3", "brand_idx")],
        *[F.when(F.col("product_idx") > 0, F.col(n)).otherwise(0.0).cast("float").alias(n) for n in names],
        F.col("price_band_idx").cast("int"),
        F.coalesce(F.col("raw_price"), F.lit(-1.0)).cast("float").alias("raw_price"),
        F.coalesce(F.col("raw_min_offer_price"), F.lit(-1.0)).cast("float").alias("raw_min_offer_price"),
        F.col("raw_pop_all").cast("float"),
        F.col("raw_n_sellers").cast("int"),
        F.col("raw_age_days").cast("float"),
    )
    return out, {"features": names, "scales": scales, "persisted": persisted}


def seller_features(
    vocabs: dict[str, DataFrame],
    sellers: DataFrame | None,
    feat_offers: DataFrame,
    train_ev: DataFrame,
    cutoff: int | None,
    event_codes: dict[str, int],
) -> tuple[DataFrame, dict[str, Any]]:
    """One row per seller index (0..N); see the module docstring. Returns (frame, info)."""
    base = _index_frame(vocabs["sellers"], "seller_idx")
    if sellers is not None:
        sv = vocabs["sellers"].select(F.col("id").alias("seller_id"), F.col("index").alias("seller_idx"))
        s = sellers.join(sv, "seller_id").select("seller_idx", "rating", "created_at")
        base = base.join(s, "seller_idx", "left")
    else:
        base = base.select(
            "seller_idx", F.lit(None).cast("double").alias("rating"), F.lit(None).cast("long").alias("created_at")
        )
    priced = feat_offers.where(F.col("price") > 0)
    minp = priced.groupBy("product_idx").agg(F.min("price").alias("_minp"))
    comp = (
        priced.join(minp, "product_idx")
        .groupBy("seller_idx")
        .agg(F.avg(F.col("price") / F.col("_minp")).alias("_comp"))
    )
    size = feat_offers.groupBy("seller_idx").agg(F.count(F.lit(1)).alias("_n_offers"))
    purchase = event_codes.get("purchase", 2)
    sales = (
        train_ev.where(F.col("seller_idx") > 0)
        .groupBy("seller_idx")
        .agg(
            F.sum(F.when(F.col("event") == purchase, 1).otherwise(0)).alias("_sales"),
            F.min("ts").alias("_first_ts"),
        )
    )
    base = base.join(comp, "seller_idx", "left").join(size, "seller_idx", "left").join(sales, "seller_idx", "left")
    if cutoff is not None:
        born = F.coalesce(F.col("created_at"), F.col("_first_ts"))
        age = F.greatest((F.lit(int(cutoff)) - born) / float(DAY), F.lit(0.0))
    else:
        age = F.lit(0.0)
    n_offers = F.coalesce(F.col("_n_offers"), F.lit(0))
    n_sales = F.coalesce(F.col("_sales"), F.lit(0))
    base = base.select(
        "*",
        F.coalesce(age, F.lit(0.0)).alias("raw_age_days"),
        n_offers.alias("raw_catalog_size"),
        n_sales.alias("raw_sales"),
        F.log1p(n_offers).alias("_log_catalog"),
        F.log1p(n_sales).alias("_log_sales"),
        F.coalesce(F.col("_comp"), F.lit(1.0)).alias("price_competitiveness"),
    ).persist()
    raw = {"log_catalog_size": "_log_catalog", "log_sales": "_log_sales", "age_days": "raw_age_days"}
    base, scales, extra = _scale(
        base, raw, "seller_idx", [F.avg("rating").alias("_mean_rating"), F.max("rating").alias("_max_rating")]
    )
    mean_rating = float(extra["_mean_rating"]) if extra.get("_mean_rating") is not None else 0.0
    max_rating = extra.get("_max_rating")
    scales["rating"] = float(max_rating) if max_rating is not None and max_rating > 0 else 1.0
    raw_rating = F.coalesce(F.col("rating"), F.lit(mean_rating))
    base = base.withColumns({"raw_rating": raw_rating, "rating": (raw_rating / scales["rating"]).cast("float")})
    scales["price_competitiveness"] = 1.0
    out = base.select(
        F.col("seller_idx").cast("int"),
        *[
            F.when(F.col("seller_idx") > 0, F.col(n)).otherwise(0.0).cast("float").alias(n)
            for n in SELLER_FEATURE_NAMES
        ],
        F.col("raw_rating").cast("float"),
        F.col("raw_catalog_size").cast("int"),
        F.col("raw_sales").cast("int"),
        F.col("raw_age_days").cast("float"),
    )
    return out, {
        "features": list(SELLER_FEATURE_NAMES),
        "scales": scales,
        "mean_rating": mean_rating,
        "persisted": [base],
    }


def product_freq(vocabs: dict[str, DataFrame], train_positives: DataFrame) -> DataFrame:
    """product_idx (0..N), count (weighted train positives), logq = log(count / total), floored.

    Lazy (no job): the total and the smallest positive count come from a one-row cross join.
    """
    base = _index_frame(vocabs["products"], "product_idx")
    counts = train_positives.groupBy("product_idx").agg(F.sum("weight").cast("double").alias("_c"))
    j = base.join(counts, "product_idx", "left").select(
        "product_idx", F.coalesce(F.col("_c"), F.lit(0.0)).alias("count")
    )
    tot = counts.agg(F.sum("_c").alias("_total"), F.min(F.when(F.col("_c") > 0, F.col("_c"))).alias("_minpos"))
    j = j.crossJoin(F.broadcast(tot))
    floor = F.coalesce(F.col("_minpos") * LOGQ_FLOOR_FRACTION, F.lit(1.0))
    logq = F.when(
        F.coalesce(F.col("_total"), F.lit(0.0)) > 0, F.log(F.greatest(F.col("count"), floor) / F.col("_total"))
    ).otherwise(F.lit(0.0))
    return j.select(F.col("product_idx").cast("int"), F.col("count").cast("double"), logq.cast("double").alias("logq"))
