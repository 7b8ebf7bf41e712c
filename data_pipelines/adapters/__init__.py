"""Source adapters: public dataset layouts → the raw data contract (``data_pipelines.schema``).

Each adapter is ``read_<name>(spark, path) -> dict[str, DataFrame]`` returning contract tables
(``events`` always; ``products``, ``offers``, ``sellers``, ``users`` where the source has them) with
string ids. ``detect_source`` recognises a directory by its files; ``read_source`` dispatches.

==========  =========================================================================================
source      recognised by
==========  =========================================================================================
contract    ``events.csv`` / ``events.tsv`` (either maybe ``.gz``) / ``events.parquet`` / ``events/`` (read by the
            prepare job itself)
olist       ``olist_orders_dataset.csv`` or ``olist_order_items_dataset.csv`` (or, catalog only,
            ``olist_products_dataset.csv``, which ``read_olist`` rejects with a clear message)
lightgcn    ``train.txt`` (+ ``test.txt``): ``user item item ...`` per line (LightGCN / Gowalla)
movielens   ``ratings.dat`` (ML-1M/10M), ``ratings.csv`` (ML-20M/25M/latest) or ``u.data`` (ML-100k)
==========  =========================================================================================
"""

from __future__ import annotations

import os

SOURCES = ("contract", "olist", "lightgcn", "movielens")

_CONTRACT_MARKERS = ("events.csv", "events.csv.gz", "events.tsv", "events.tsv.gz", "events.parquet", "events")
_OLIST_MARKERS = ("olist_orders_dataset.csv", "olist_order_items_dataset.csv", "olist_products_dataset.csv")
_LIGHTGCN_MARKERS = ("train.txt",)
_MOVIELENS_MARKERS = ("ratings.dat", "ratings.csv", "u.data")


def detect_source(path: str) -> str:
    """Which adapter reads ``path`` (a directory): one of :data:`SOURCES`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no known layout; the message lists the files each source needs.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path {path!r} does not exist")
    if os.path.isfile(path):
        names = {os.path.basename(path)}
    else:
        names = set(os.listdir(path))
    for source, markers in (
        ("contract", _CONTRACT_MARKERS),
        ("olist", _OLIST_MARKERS),
        ("lightgcn", _LIGHTGCN_MARKERS),
        ("movielens", _MOVIELENS_MARKERS),
    ):
        if names & set(markers):
            return source
    raise ValueError(
        f"cannot tell the source of {path!r}: expected contract tables ({', '.join(_CONTRACT_MARKERS)}), "
        f"Olist CSVs ({', '.join(_OLIST_MARKERS)}), LightGCN files ({', '.join(_LIGHTGCN_MARKERS)}) or "
        f"MovieLens ratings ({', '.join(_MOVIELENS_MARKERS)}); found {sorted(names)[:20]}"
    )


def read_source(
    spark, source: str, path: str, val_last_fraction: float = 0.0, seed: int = 17, line_order: bool = False
) -> dict | None:
    """Read ``path`` with the adapter for ``source`` (``"auto"`` detects it).

    ``val_last_fraction``, ``seed`` and ``line_order`` reach the LightGCN adapter (the end of each
    train line as val; line positions as order timestamps).

    Returns:
        ``dict[str, DataFrame]`` of contract tables, or None for ``contract`` (the prepare job reads
        contract tables itself).
    """
    if source == "auto":
        source = detect_source(path)
    if source == "contract":
        return None
    if source == "olist":
        from data_pipelines.adapters.olist import read_olist

        return read_olist(spark, path)
    if source == "lightgcn":
        from data_pipelines.adapters.lightgcn import read_lightgcn

        return read_lightgcn(spark, path, val_last_fraction, seed, line_order)
    if source == "movielens":
        from data_pipelines.adapters.movielens import read_movielens

        return read_movielens(spark, path)
    raise ValueError(f"unknown data source {source!r}; expected one of {SOURCES} or 'auto'")


__all__ = ["SOURCES", "detect_source", "read_source"]
