"""MovieLens ratings → the raw data contract.

Ratings, in the first layout found under ``path``:

- ``ratings.dat`` (ML-1M, ML-10M): ``UserID::MovieID::Rating::Timestamp``
- ``ratings.csv`` (ML-20M, ML-25M, ml-latest): header ``userId,movieId,rating,timestamp``
- ``u.data`` (ML-100k): tab-separated ``user item rating timestamp``, no header

Movies when present: ``movies.dat`` (``MovieID::Title::Genres``, Latin-1 in ML-1M), ``movies.csv``
(``movieId,title,genres``) or ``u.item`` (``|``-separated, 19 genre flags, names from ``u.genre``).

Decisions:

- ``event_type``: rating >= 4 → ``purchase`` (a liked item: the target), otherwise ``view`` (watched
  but not liked: a weak signal, weighted low by ``data.event_weights``). The numeric rating itself is
  not a contract column and is not passed on.
- ``timestamp``: epoch seconds (long).
- ``products``: product_id, title, category = the first listed genre (null for "(no genres listed)"),
  genres = all genres joined with ``|``.
"""

from __future__ import annotations

import csv
import io
import os

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

LIKED_RATING = 4.0
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
NO_GENRES = "(no genres listed)"


def _text(file: str) -> str:
    raw = open(file, "rb").read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # ML-1M / ML-100k


def _ratings(spark, path: str) -> DataFrame:
    dat, csv_, udata = (os.path.join(path, n) for n in ("ratings.dat", "ratings.csv", "u.data"))
    if os.path.exists(dat):
        parts = F.split(F.col("value"), "::")
        df = (
            spark.read.text(dat)
            .where(F.length(F.trim("value")) > 0)
            .select(*[parts[i].alias(c) for i, c in enumerate(("user", "item", "rating", "ts"))])
        )
    elif os.path.exists(csv_):
        df = spark.read.csv(csv_, header=True, inferSchema=False).select(
            F.col("userId").alias("user"),
            F.col("movieId").alias("item"),
            F.col("rating"),
            F.col("timestamp").alias("ts"),
        )
    elif os.path.exists(udata):
        df = spark.read.csv(udata, sep="\t", header=False, inferSchema=False).toDF(
            "user", "item", "rating", "ts"
        )
    else:
        raise FileNotFoundError(f"MovieLens data at {path!r} needs ratings.dat, ratings.csv or u.data")
    rating = F.col("rating").cast("double")
    return df.select(
        F.trim("user").alias("user_id"),
        F.trim("item").alias("product_id"),
        F.when(rating >= LIKED_RATING, "purchase").otherwise("view").alias("event_type"),
        F.trim("ts").cast("long").alias("timestamp"),
    )


def _movie_rows(path: str) -> list[tuple[str, str, str | None, str | None]] | None:
    rows = []
    dat, csv_, uitem = (os.path.join(path, n) for n in ("movies.dat", "movies.csv", "u.item"))
    if os.path.exists(dat):
        for line in _text(dat).splitlines():
            if line.strip():
                mid, title, genres = line.split("::", 2)
                rows.append((mid.strip(), title, genres.strip()))
    elif os.path.exists(csv_):
        reader = csv.DictReader(io.StringIO(_text(csv_)))
        for r in reader:
            rows.append((r["movieId"].strip(), r["title"], r["genres"].strip()))
    elif os.path.exists(uitem):
        names = list(ML100K_GENRES)
        ugenre = os.path.join(path, "u.genre")
        if os.path.exists(ugenre):
            pairs = [ln.rsplit("|", 1) for ln in _text(ugenre).splitlines() if "|" in ln]
            names = [n for n, _ in sorted(pairs, key=lambda p: int(p[1]))]
        for line in _text(uitem).splitlines():
            if not line.strip():
                continue
            f = line.split("|")
            flags = f[5 : 5 + len(names)]
            rows.append(
                (
                    f[0].strip(),
                    f[1],
                    "|".join(n for n, v in zip(names, flags, strict=False) if v.strip() == "1"),
                )
            )
    else:
        return None
    out = []
    for mid, title, genres in rows:
        genres = None if not genres or genres == NO_GENRES else genres
        out.append((mid, title, genres.split("|")[0] if genres else None, genres))
    return out


def read_movielens(spark, path: str) -> dict[str, DataFrame]:
    """Read a MovieLens folder: ``events`` and, when a movies file exists, ``products``."""
    tables = {"events": _ratings(spark, path)}
    movies = _movie_rows(path)
    if movies is not None:
        import pandas as pd

        cols = ("product_id", "title", "category", "genres")
        schema = T.StructType([T.StructField(c, T.StringType()) for c in cols])
        # via pandas/Arrow: no Python worker processes needed
        tables["products"] = spark.createDataFrame(pd.DataFrame(movies, columns=list(cols)), schema)
    return tables
