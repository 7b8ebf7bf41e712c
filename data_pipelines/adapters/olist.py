"""The Brazilian E-Commerce Public Dataset by Olist → the raw data contract.

Needs ``olist_orders_dataset.csv``, ``olist_order_items_dataset.csv`` and
``olist_customers_dataset.csv``; uses ``olist_products_dataset.csv``, ``olist_sellers_dataset.csv``,
``olist_order_reviews_dataset.csv`` and ``product_category_name_translation.csv`` when present (the
file names and headers of the public Kaggle/GitHub release). Payments and geolocation are not used.

Decisions:

- A person is ``customer_unique_id``; Olist issues a new ``customer_id`` per order.
- Orders with status ``canceled`` or ``unavailable`` are dropped (about 1.2% of orders): they are not
  purchases. Every other status (delivered, shipped, invoiced, processing, approved, created) counts.
- Olist lists one item row per unit (``order_item_id`` 1..n). Rows of the same order, product and
  seller become ONE ``purchase`` event with ``quantity`` = number of rows and ``price`` = unit price,
  so a multi-unit purchase is not n duplicate positives. ``timestamp`` = order_purchase_timestamp
  (epoch seconds, read as UTC wall-clock: Olist's are Brasília local times), ``session_id`` = order_id.
- ``products``: every catalog product; ``category`` = English category name via the translation
  table, else the Portuguese name, else null; numeric attributes (publisher's "lenght" spelling
  fixed: name_length, description_length, photos_qty, weight_g, length_cm, height_cm, width_cm);
  ``price`` = median sold unit price; ``created_at`` = first sale (epoch seconds; Olist has no
  listing date).
- ``sellers``: region = seller_state, city; ``rating`` = mean review score over the kept orders that
  contain the seller's items (an order's several reviews are averaged first; null without reviews);
  ``created_at`` = first sale (epoch seconds).
- ``offers``: distinct (product_id, seller_id) sold; price = median unit price; stock null
  (unknown); shipping_days = median over delivered orders of (delivered − purchased) in days.
- ``users``: user_id = customer_unique_id, region = customer_state of the person's latest order.
"""

from __future__ import annotations

import csv
import os

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

ORDERS = "olist_orders_dataset.csv"
ITEMS = "olist_order_items_dataset.csv"
CUSTOMERS = "olist_customers_dataset.csv"
PRODUCTS = "olist_products_dataset.csv"
SELLERS = "olist_sellers_dataset.csv"
REVIEWS = "olist_order_reviews_dataset.csv"
TRANSLATION = "product_category_name_translation.csv"

DROPPED_STATUSES = ("canceled", "unavailable")
TS_FORMAT = "yyyy-MM-dd HH:mm:ss"

PRODUCT_NUMERIC = {
    "product_name_lenght": "name_length",
    "product_description_lenght": "description_length",
    "product_photos_qty": "photos_qty",
    "product_weight_g": "weight_g",
    "product_length_cm": "length_cm",
    "product_height_cm": "height_cm",
    "product_width_cm": "width_cm",
}


def _csv(spark, path: str, name: str, required: bool = True) -> DataFrame | None:
    f = os.path.join(path, name)
    if not os.path.exists(f):
        if required:
            raise FileNotFoundError(
                f"Olist data at {path!r} lacks {name}; the adapter needs {ORDERS}, {ITEMS} and {CUSTOMERS} "
                "from the full 'Brazilian E-Commerce Public Dataset by Olist' (the catalog-only folder has "
                "no orders)"
            )
        return None
    # The header is read here rather than by Spark: no extra Spark job per file, and the UTF-8 byte-order
    # mark of the translation file (which Spark would keep in the first column name) is dropped.
    with open(f, encoding="utf-8-sig", newline="") as fh:
        header = next(csv.reader(fh), [])
    schema = T.StructType([T.StructField(c.strip(), T.StringType()) for c in header])
    # multiLine + escape: review comments contain quoted newlines and doubled quotes.
    return spark.read.csv(
        f, schema=schema, header=True, enforceSchema=True, multiLine=True, escape='"', encoding="UTF-8"
    )


def _epoch(col: str):
    return F.unix_timestamp(F.col(col), TS_FORMAT)


def read_olist(spark, path: str) -> dict[str, DataFrame]:
    """Read an Olist folder (see the module docstring for what comes out)."""
    orders_all = _csv(spark, path, ORDERS).select(
        "order_id",
        "customer_id",
        F.lower(F.trim("order_status")).alias("status"),
        _epoch("order_purchase_timestamp").alias("timestamp"),
        _epoch("order_delivered_customer_date").alias("delivered"),
    )
    customers = _csv(spark, path, CUSTOMERS).select(
        "customer_id", F.col("customer_unique_id").alias("user_id"), F.col("customer_state").alias("region")
    )
    orders = orders_all.where(~F.col("status").isin(*DROPPED_STATUSES)).drop("status")
    items = (
        _csv(spark, path, ITEMS)
        .select("order_id", "product_id", "seller_id", F.col("price").cast("double").alias("price"))
        .join(orders, "order_id")
        .join(customers.select("customer_id", "user_id"), "customer_id")
        # Reused by every table; Olist is small (about 113k item rows), so caching costs a few MB.
        .cache()
    )

    events = (
        items.groupBy("order_id", "product_id", "seller_id", "user_id", "timestamp")
        .agg(F.count(F.lit(1)).alias("quantity"), F.avg("price").alias("price"))
        .select(
            "user_id",
            "product_id",
            F.lit("purchase").alias("event_type"),
            "timestamp",
            "seller_id",
            "price",
            "quantity",
            F.col("order_id").alias("session_id"),
        )
    )

    # offers: per (product, seller) median unit price and median delivery time of its orders
    sold = items.select("order_id", "product_id", "seller_id", "price", "timestamp", "delivered")
    ship = (
        sold.select(
            "order_id",
            "product_id",
            "seller_id",
            ((F.col("delivered") - F.col("timestamp")) / 86400.0).alias("days"),
        )
        .where(F.col("days").isNotNull())
        .distinct()
        .groupBy("product_id", "seller_id")
        .agg(F.median("days").alias("shipping_days"))
    )
    offers = (
        sold.groupBy("product_id", "seller_id")
        .agg(F.median("price").alias("price"))
        .join(ship, ["product_id", "seller_id"], "left")
        .select("product_id", "seller_id", "price", F.lit(None).cast("long").alias("stock"), "shipping_days")
    )

    # products
    product_sales = sold.groupBy("product_id").agg(
        F.median("price").alias("price"), F.min("timestamp").alias("created_at")
    )
    catalog = _csv(spark, path, PRODUCTS, required=False)
    if catalog is None:
        products = product_sales.select(
            "product_id", F.lit(None).cast("string").alias("category"), "price", "created_at"
        )
    else:
        translation = _csv(spark, path, TRANSLATION, required=False)
        cat = F.col("product_category_name")
        if translation is not None:
            catalog = catalog.join(
                translation.select("product_category_name", "product_category_name_english"),
                "product_category_name",
                "left",
            )
            cat = F.coalesce(F.col("product_category_name_english"), cat)
        products = catalog.select(
            "product_id",
            cat.alias("category"),
            *[F.col(src).cast("double").alias(dst) for src, dst in PRODUCT_NUMERIC.items()],
        ).join(product_sales, "product_id", "left")

    # sellers: rating = mean over the seller's orders of the order's mean review score
    seller_sales = sold.groupBy("seller_id").agg(F.min("timestamp").alias("created_at"))
    reviews = _csv(spark, path, REVIEWS, required=False)
    if reviews is not None:
        order_score = (
            reviews.select("order_id", F.col("review_score").cast("double").alias("score"))
            .where(F.col("score").isNotNull())
            .groupBy("order_id")
            .agg(F.avg("score").alias("score"))
        )
        rating = (
            sold.select("order_id", "seller_id")
            .distinct()
            .join(order_score, "order_id")
            .groupBy("seller_id")
            .agg(F.avg("score").alias("rating"))
        )
        seller_sales = seller_sales.join(rating, "seller_id", "left")
    else:
        seller_sales = seller_sales.withColumn("rating", F.lit(None).cast("double"))
    seller_file = _csv(spark, path, SELLERS, required=False)
    if seller_file is None:
        sellers = seller_sales.select(
            "seller_id", "rating", F.lit(None).cast("string").alias("region"), "created_at"
        )
    else:
        sellers = (
            seller_file.select(
                "seller_id", F.col("seller_state").alias("region"), F.col("seller_city").alias("city")
            )
            .join(seller_sales, "seller_id", "left")
            .select("seller_id", "rating", "region", "city", "created_at")
        )

    # users: state of the person's latest order
    users = (
        customers.join(orders_all.select("customer_id", "timestamp"), "customer_id")
        .groupBy("user_id")
        .agg(F.max_by("region", F.coalesce("timestamp", F.lit(0))).alias("region"))
    )
    return {"events": events, "products": products, "offers": offers, "sellers": sellers, "users": users}
