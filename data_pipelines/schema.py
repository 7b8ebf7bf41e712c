"""The raw data contract and the layout of the prepared artifact (the boundary to ``towers``).

Raw tables (CSV or Parquet, one directory; a table is ``NAME.csv``, ``NAME.parquet`` or a folder
``NAME/`` of part files). IDs are strings; integer indexes are internal to the pipeline.

- ``events`` (required): user_id, product_id; optional event_type (view|cart|purchase, default
  purchase), timestamp (ISO-8601 string, epoch seconds or a timestamp column), seller_id, price,
  quantity, session_id. A source may add ``split`` (train|val|test) for a predefined split.
- ``products`` (optional): product_id; optional category (path ``a > b > c``), brand, title, price, ...
- ``offers`` (optional): product_id, seller_id; optional price, stock, shipping_days.
- ``sellers`` (optional): seller_id; optional rating, region, created_at, ...
- ``users`` (optional): user_id; optional region, signup_date, ...

Prepared artifact (``PREPARED_DIR``), written atomically with a ``manifest.json``::

    vocab/{users,products,sellers,categories,brands}.parquet   id:string, index:int32, count:int64
        index 0 is reserved for unknown / below min-frequency and is not listed.
    examples/{train,val,test}/*.parquet                         one row per positive interaction
    features/products.parquet   product_idx + EXAMPLE-independent product features (see PRODUCT_FEATURES)
    features/sellers.parquet    seller_idx + seller features (see SELLER_FEATURES)
    features/offers.parquet     product_idx, seller_idx, price, stock, shipping_days
    features/product_freq.parquet  product_idx, count, logq   (train-split sampling-bias correction)
    histories/{train,full}.parquet user_idx, products:list<int32>, sellers:list<int32>, types:list<int8>
        ``train``: the user's training-period events in time order (what the model may see when
        predicting val/test); ``full``: all accepted events (what serving sees).
    rejected/*.parquet          every rejected raw row with ``table`` and ``reason``
    manifest.json

Example columns (``EXAMPLE_COLUMNS``): user_idx, product_idx, seller_idx (0 = unknown), weight
(by event type), event (0 view, 1 cart, 2 purchase), ts (epoch seconds; 0 when the data has no time),
hist_products / hist_sellers (list<int32>, oldest first, at most ``data.max_history``, only events
strictly before ``ts``; for data without time, the user's other training events), hour and dow
(context; -1 when unknown).
"""

from __future__ import annotations

EVENT_TYPES = ("view", "cart", "purchase")
EVENT_CODE = {"view": 0, "cart": 1, "purchase": 2}
# Names other event logs use for the same three kinds (RetailRocket's addtocart / transaction, Taobao's
# pv / fav / buy, GA-style page_view / add_to_cart, ...), keyed by the lower-cased value with everything
# but letters and digits removed ("Add-To-Cart" -> "addtocart"). Favourites and wish lists are intent
# short of a purchase, as a cart is. Anything else (remove_from_cart, refund) stays unknown and rejected.
EVENT_ALIASES = {
    **dict.fromkeys(("views", "viewed", "pageview", "pageviews", "detail", "detailview", "productview",
                     "click", "clicks", "clicked", "pv", "visit"), "view"),
    **dict.fromkeys(("carts", "addtocart", "addedtocart", "addtobasket", "basket", "fav", "favorite",
                     "favourite", "wishlist", "addtowishlist"), "cart"),
    **dict.fromkeys(("purchases", "purchased", "buy", "buys", "bought", "order", "orders", "ordered",
                     "transaction", "transactions", "checkout", "sale", "conversion"), "purchase"),
}


# Numeric timestamps in a finer unit than seconds, told apart by magnitude: (smallest value, units
# per second), finest first. Seconds of the years 1973-5138 lie in [1e8, 1e11), milliseconds from
# 1973 on are >= 1e11, microseconds >= 1e14, nanoseconds >= 1e17.
EPOCH_UNITS = ((1e17, 1e9), (1e14, 1e6), (1e11, 1e3))


def event_alias_key(value: str) -> str:
    """The key of an event type in :data:`EVENT_ALIASES`: lower case, letters and digits only."""
    return "".join(ch for ch in value.lower() if ch.isascii() and ch.isalnum())


REQUIRED_COLUMNS = {
    "events": ("user_id", "product_id"),
    "products": ("product_id",),
    "offers": ("product_id", "seller_id"),
    "sellers": ("seller_id",),
    "users": ("user_id",),
}
OPTIONAL_COLUMNS = {
    "events": ("event_type", "timestamp", "seller_id", "price", "quantity", "session_id", "split"),
    "products": ("category", "brand", "title", "price", "created_at"),
    "offers": ("price", "stock", "shipping_days"),
    "sellers": ("rating", "region", "created_at"),
    "users": ("region", "signup_date"),
}
TABLES = tuple(REQUIRED_COLUMNS)

VOCABS = ("users", "products", "sellers", "categories", "brands")
SPLITS = ("train", "val", "test")

EXAMPLE_COLUMNS = (
    "user_idx",
    "product_idx",
    "seller_idx",
    "weight",
    "event",
    "ts",
    "hist_products",
    "hist_sellers",
    "hour",
    "dow",
)

# Numeric product features, already scaled to roughly unit range by the pipeline.
PRODUCT_FEATURES = (
    "log_price",
    "price_band",
    "log_pop_7d",
    "log_pop_30d",
    "log_pop_all",
    "n_sellers",
    "log_min_offer_price",
    "age_days",
)
# Categorical product features (int32 indexes into vocab/categories and vocab/brands; 0 unknown).
PRODUCT_CATEGORICALS = ("cat_l1", "cat_l2", "cat_l3", "brand_idx")

SELLER_FEATURES = (
    "rating",
    "log_catalog_size",
    "log_sales",
    "price_competitiveness",
    "age_days",
)
