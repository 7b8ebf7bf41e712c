"""Train / val / test assignment of events (``DataConfig.split``).

Every accepted event gets a ``split`` column (``train``, ``val`` or ``test``); examples are the
positive events of each split, histories and features read the train (or train+val) events.
Validation is always carved from what would otherwise be training data, never from test.

- ``temporal``: global cutoffs at time quantiles of the positive events: the last ``test_fraction``
  of them (by time) is test, the ``val_fraction`` before it val. Every event (positive or not)
  follows its timestamp. The quantiles are exact (:func:`exact_quantiles`), so they do not depend
  on the order of rows in Spark's partitions.
- ``leave_last_out``: per user, by (ts, row hash): the last positive is test and the
  second-to-last val, for users with at least 3 positives (others: all train). A user's
  non-positive events after the val/test target follow it into val/test.
- ``predefined``: events carry ``split`` = train|val|test; rows given as val stay val, and a seeded
  random ``val_fraction`` of each user's train positives is carved to val as well (stochastic
  rounding per user, at least one positive stays train; ``val_fraction`` = 0: only the given val).
- ``random``: per user seeded random test and val positives (same rounding; one stays train).
  Non-positive events stay train.
- ``val_carve`` = ``last`` makes the two carves above take each user's latest positives (by ts,
  then row hash) instead of random ones: for sequential data whose test follows the training
  events. Without timestamps there is no order here, so only rows the source gives as val are
  val (the LightGCN adapter marks the end of each ``train.txt`` line: it is ordered).
- ``auto``: predefined when a split column exists, else temporal with timestamps (leave_last_out
  when ``data.timestamps`` = order: they order each user's events but are not a shared clock),
  else random. When the temporal cutoffs would leave val or test empty or train with less than
  half its share (timestamps too coarse: one date for all events), random instead, recorded as
  ``fallback`` in the info (:func:`temporal_problem`); an explicit ``temporal`` raises then.

All randomness is a hash of (seed, row content), so reruns give the same assignment.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from recsys.config import DataConfig

METHODS = ("auto", "temporal", "leave_last_out", "predefined", "random")
_SCALE = 1 << 30


def resolve_method(requested: str, has_split_column: bool, has_ts: bool, has_clock: bool = True) -> str:
    """The concrete split method; raises ValueError when the data cannot support ``requested``.

    ``has_clock``: the timestamps are times (``data.timestamps`` = time), not only an order.
    """
    if requested not in METHODS:
        raise ValueError(f"data.split: unknown method '{requested}' (valid: {', '.join(METHODS)})")
    if requested == "auto":
        if has_split_column:
            return "predefined"
        return ("temporal" if has_clock else "leave_last_out") if has_ts else "random"
    if requested in ("temporal", "leave_last_out") and not has_ts:
        raise ValueError(f"data.split={requested} needs event timestamps, and these events have none")
    if requested == "temporal" and not has_clock:
        raise ValueError(
            "data.split=temporal cuts all users at shared times, and data.timestamps=order says the timestamps "
            "only order each user's events: use leave_last_out, predefined or random"
        )
    if requested == "predefined" and not has_split_column:
        raise ValueError("data.split=predefined needs a 'split' column (train|val|test) in the events")
    return requested


def uniform(seed: int, *cols: Column) -> Column:
    """A deterministic pseudo-random double in [0, 1) from the seed and the given columns."""
    return F.pmod(F.xxhash64(F.lit(int(seed)), *cols), F.lit(_SCALE)).cast("double") / float(_SCALE)


def n_random(n: Column, fraction: float, u: Column) -> Column:
    """Stochastic rounding of ``fraction * n``: expected value exactly ``fraction * n``."""
    return F.floor(F.lit(float(fraction)) * n + u).cast("long")


def is_positive(positive_codes: list[int] | tuple[int, ...]) -> Column:
    """True for events (``event`` column, an int code) whose code is one of ``positive_codes``."""
    return F.col("event").isin(*positive_codes) if positive_codes else F.lit(False)


def exact_quantiles(df: DataFrame, col: str, qs: list[float], rel_err: float = 1e-4) -> list[float | None]:
    """Exact q-quantiles of a numeric column: the ``ceil(q n)``-th smallest non-null value (at least the 1st).

    Spark's ``approxQuantile`` answers from summaries whose result depends on the order of rows in
    the partitions, which a shuffle does not fix: reruns of the same job moved cutoffs by seconds and
    with them a few events between splits. Here the approximate quantiles at ``q -/+ 2 rel_err`` only
    bound a small window of values, counted and collected exactly.

    Args:
        df: the rows.
        col: a numeric column.
        qs: quantiles in [0, 1].
        rel_err: relative error of the bounding approximate quantiles (window size ~4 rel_err n).

    Returns:
        One value per q, or ``None`` for each when the column has no non-null value.
    """
    x = df.select(F.col(col).alias("x")).where(F.col("x").isNotNull())
    eps = 2 * rel_err
    bounds = x.approxQuantile("x", [b for q in qs for b in (max(0.0, q - eps), min(1.0, q + eps))], rel_err)
    if not bounds:  # no non-null value
        return [None] * len(qs)
    windows = [(bounds[2 * i], bounds[2 * i + 1]) for i in range(len(qs))]
    # the row count and the counts below each window in one pass
    below = x.agg(
        F.count(F.lit(1)).alias("n"),
        *[F.sum((F.col("x") < lo).cast("long")).alias(f"b{i}") for i, (lo, _) in enumerate(windows)],
    ).first()
    n = int(below["n"])
    ranks = [min(n, max(1, math.ceil(q * n))) for q in qs]
    inside = F.lit(False)
    for lo, hi in windows:
        inside = inside | F.col("x").between(lo, hi)
    values = sorted(r[0] for r in x.where(inside).collect())
    out: list[float | None] = []
    for i, ((lo, hi), r) in enumerate(zip(windows, ranks, strict=True)):
        w = [v for v in values if lo <= v <= hi]
        k = r - int(below[f"b{i}"] or 0)
        if 1 <= k <= len(w):
            out.append(w[k - 1])
        else:  # outside the approximate bounds (should not happen): the exact value from a full sort
            out.append(x.orderBy("x").offset(r - 1).first()[0])
    return out


def temporal(
    ev: DataFrame, cfg: DataConfig, positive_codes: list[int], cutoff_events: DataFrame | None = None
) -> tuple[DataFrame, dict[str, Any]]:
    pos = (ev if cutoff_events is None else cutoff_events).where(is_positive(positive_codes))
    qs = [max(0.0, 1.0 - cfg.test_fraction - cfg.val_fraction), max(0.0, 1.0 - cfg.test_fraction)]
    got = [q for q in exact_quantiles(pos, "ts", qs) if q is not None]
    if len(got) < 2:
        val_cut = test_cut = None
        out = ev.withColumn("split", F.lit("train"))
    else:
        val_cut, test_cut = int(got[0]), int(got[1])
        if cfg.test_fraction <= 0:
            test_cut = None
        if cfg.val_fraction <= 0:
            val_cut = None
        split = F.lit("train")
        if val_cut is not None:
            split = F.when(F.col("ts") >= val_cut, F.lit("val")).otherwise(split)
        if test_cut is not None:
            split = F.when(F.col("ts") >= test_cut, F.lit("test")).otherwise(split)
        out = ev.withColumn("split", split)

    def iso(t):
        return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

    info = {"val_cutoff": val_cut, "test_cutoff": test_cut, "val_cutoff_iso": iso(val_cut), "test_cutoff_iso": iso(test_cut)}
    info["positive_shares"] = _shares(pos, val_cut, test_cut)
    return out, info


def _shares(pos: DataFrame, val_cut: int | None, test_cut: int | None) -> dict[str, float]:
    """The shares of the positive events ``pos`` that the cutoffs put in train, val and test."""
    if val_cut is None and test_cut is None:  # no cutoffs: all train, no pass over the events
        return {"train": 1.0, "val": 0.0, "test": 0.0}
    ts = F.col("ts")
    in_val = F.lit(False) if val_cut is None else (ts >= val_cut) & (F.lit(True) if test_cut is None else ts < test_cut)
    in_test = F.lit(False) if test_cut is None else ts >= test_cut
    row = pos.agg(F.count(F.lit(1)).alias("n"), F.sum(in_val.cast("long")).alias("val"),
                  F.sum(in_test.cast("long")).alias("test")).first()
    n = max(int(row["n"]), 1)
    val, test = int(row["val"] or 0) / n, int(row["test"] or 0) / n
    return {"train": round(1.0 - val - test, 6), "val": round(val, 6), "test": round(test, 6)}


def temporal_problem(shares: dict[str, float], cfg: DataConfig) -> str | None:
    """Why time cutoffs at these positive shares make an unusable split, or None when they do not.

    Cutoffs are at quantiles of the positives' timestamps; with coarse timestamps (a date, or one
    value for all) a tie at the cutoff moves a whole day into val/test, and with one value every
    positive lands in test and train is empty. Unusable: a wanted val or test split that is empty,
    or train with less than half its intended share.
    """
    want_train = 1.0 - cfg.val_fraction - cfg.test_fraction
    pct = {k: f"{100 * v:.1f}%" for k, v in shares.items()}
    got = f"train {pct['train']}, val {pct['val']}, test {pct['test']} of the positive events"
    if cfg.test_fraction > 0 and shares["test"] == 0:
        return f"no positive event is at or after the test cutoff ({got})"
    if cfg.val_fraction > 0 and shares["val"] == 0:
        return f"no positive event falls between the val and test cutoffs ({got})"
    if shares["train"] < 0.5 * want_train:
        return f"the cutoffs give {got}, for an intended train share of {100 * want_train:.0f}%"
    return None


def leave_last_out(ev: DataFrame, positive_codes: list[int], by: list[str]) -> DataFrame:
    key = F.struct(F.col("ts"), F.col("rid"))
    pos_key = F.when(is_positive(positive_codes), key)
    w_all = Window.partitionBy(*by)
    w_ord = Window.partitionBy(*by, is_positive(positive_codes)).orderBy(F.desc("ts"), F.desc("rid"))
    ranked = ev.withColumn("_pr", F.when(is_positive(positive_codes), F.row_number().over(w_ord)))
    ranked = ranked.withColumn("_npos", F.count(pos_key).over(w_all))
    ranked = ranked.withColumn("_test_key", F.max(F.when(F.col("_pr") == 1, key)).over(w_all))
    ranked = ranked.withColumn("_val_key", F.max(F.when(F.col("_pr") == 2, key)).over(w_all))
    eligible = F.col("_npos") >= 3
    split = (
        F.when(eligible & (key >= F.col("_test_key")), F.lit("test"))
        .when(eligible & (key >= F.col("_val_key")), F.lit("val"))
        .otherwise(F.lit("train"))
    )
    return ranked.withColumn("split", split).drop("_pr", "_npos", "_test_key", "_val_key")


def _carve(
    ev: DataFrame, cfg: DataConfig, positive_codes: list[int], base: Column, test_fraction: float, by: list[str]
) -> DataFrame:
    """Per user, ``test_fraction`` of the candidate positives to test (when > 0) and ``val_fraction``
    to val, random ones or (``cfg.val_carve`` = last) the latest; ``base`` is the split before
    carving; candidates = positives with base train."""
    cand = is_positive(positive_codes) & (base == "train")
    w_user = Window.partitionBy(*by)
    if cfg.val_carve == "last":
        order = [F.col("ts").desc(), F.col("rid").desc()]
    else:
        order = [uniform(cfg.seed, F.col("rid")), F.col("rid")]
    w_ord = Window.partitionBy(*by, cand).orderBy(*order)
    x = ev.withColumn("_base", base).withColumn("_cand", cand)
    x = x.withColumn("_r", F.row_number().over(w_ord))
    x = x.withColumn("_n", F.sum(F.col("_cand").cast("long")).over(w_user))
    n = F.col("_n")
    n_test = F.least(n_random(n, test_fraction, uniform(cfg.seed, F.col("user_id"), F.lit("test"))), n - 1)
    n_test = F.greatest(n_test, F.lit(0))
    n_val = F.least(n_random(n, cfg.val_fraction, uniform(cfg.seed, F.col("user_id"), F.lit("val"))), n - 1 - n_test)
    n_val = F.greatest(n_val, F.lit(0))
    split = (
        F.when(F.col("_cand") & (F.col("_r") <= n_test), F.lit("test"))
        .when(F.col("_cand") & (F.col("_r") <= n_test + n_val), F.lit("val"))
        .otherwise(F.col("_base"))
    )
    return x.withColumn("split", split).drop("_base", "_cand", "_r", "_n")


def assign_splits(
    ev: DataFrame,
    cfg: DataConfig,
    has_ts: bool,
    positive_codes: list[int],
    by: tuple[str, ...] = ("user_id",),
    cutoff_events: DataFrame | None = None,
) -> tuple[DataFrame, dict[str, Any]]:
    """Add ``split`` to the events.

    Args:
        ev: typed events with user_id, event (int code), ts, rid and, for predefined, split.
        cfg: the data config (split method, fractions, seed).
        has_ts: whether the events have timestamps.
        positive_codes: event codes that are training positives.
        by: the columns that identify a user for the per-user windows; pass a column the events
            are already partitioned by first (``("user_idx", "user_id")``) to avoid a shuffle.
        cutoff_events: the same events (``event`` and ``ts`` columns) to compute the temporal
            cutoffs from, when that is cheaper than ``ev`` (a cached frame); default ``ev``.

    Returns:
        ``(events with split, info)``; ``info`` has method, requested, cutoffs and has_timestamps.
    """
    has_split = "split" in ev.columns
    if cfg.timestamps not in ("time", "order"):
        raise ValueError(f"data.timestamps must be 'time' or 'order', got {cfg.timestamps!r}")
    method = resolve_method(cfg.split, has_split, has_ts, cfg.timestamps == "time")
    if cfg.val_carve not in ("random", "last"):
        raise ValueError(f"data.val_carve must be 'random' or 'last', got {cfg.val_carve!r}")
    if cfg.val_carve == "last" and not has_ts:
        if method != "predefined":
            raise ValueError("data.val_carve=last needs timestamps, or a predefined split whose source gives the val rows")
        cfg = replace(cfg, val_fraction=0.0)  # no order to carve by: the source gave the val rows
    info: dict[str, Any] = {
        "requested": cfg.split,
        "method": method,
        "has_timestamps": has_ts,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "seed": cfg.seed,
        "val_carve": cfg.val_carve,
        "timestamps": cfg.timestamps if has_ts else None,
    }
    if method == "temporal":
        out, cut = temporal(ev, cfg, positive_codes, cutoff_events)
        # no cutoffs (no positive has a timestamp): everything stays train, as before this check
        no_cut = cut["val_cutoff"] is None and cut["test_cutoff"] is None
        problem = None if no_cut else temporal_problem(cut["positive_shares"], cfg)
        if problem and cfg.split == "temporal":
            raise ValueError(
                f"data.split=temporal: {problem}; the timestamps are too coarse or too few for time cutoffs: "
                "use data.split=random (or auto, which falls back to it) or leave_last_out"
            )
        if problem:  # auto: a per-user random split instead, said in the manifest
            method = "random"
            info.update(method=method, rejected_cutoffs=cut,
                        fallback=f"temporal cutoffs unusable, split at random per user instead: {problem}")
        else:
            info["cutoffs"] = cut
    if method == "leave_last_out":
        out = leave_last_out(ev, positive_codes, list(by))
    elif method == "predefined":
        out = _carve(ev, cfg, positive_codes, F.col("split"), 0.0, list(by))
    elif method == "random":
        base = ev.drop("split") if has_split else ev
        out = _carve(base, cfg, positive_codes, F.lit("train"), cfg.test_fraction, list(by))
    if not has_ts:
        info["note"] = "no timestamps: temporal splits and features (popularity windows, age, hour/dow) are unavailable"
    return out, info
