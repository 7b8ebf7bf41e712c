"""``recsys ranker-data``: the ranker's training and evaluation lists, built with Spark into Parquet.

Layout of ``RUN_DIR/ranker_data/`` (written atomically, with a manifest)::

    offers.parquet                 offer features (ranking.features.OFFER_FEATURES) per (product, seller)
    {train,test}/users.parquet     one row per list: user_idx, hour, dow, user_vec, hist_products,
                                   hist_sellers, USER_FEATURES, n_events, n_targets
    candidates/phase={train,test}/ Spark part files, one row per (user, product, offer):
                                   user_idx, product_idx, seller_idx, rank, score, added, event,
                                   label, p_events, OFFER_FEATURES

No leakage, by construction:

* ``train`` lists are the **val** split's users. Their history, user features and exclusions come
  from the train split only, the towers in ``RUN_DIR/model`` were trained on the train split only,
  so retrieving their top-N is "the model as it stood at training time". Labels come only from
  their val events: per (product, seller) the strongest event (purchase > cart > view → the weights
  ``ranking.label_weights``; 0 when none). Val positives that retrieval missed are added (every offer
  of the product, with the rank the towers really gave it, > N, and ``added`` set), except items
  excluded as already bought. The ranker never sees those rows' true rank and score: their
  candidate features are their list's mean plus a not-retrieved flag
  (:func:`ranking.features.candidate_features`).
* ``test`` lists are the **test** split's users, history = train + val, labels from test events,
  and no missed positives are added (evaluation sees exactly what serving would).
* Product / seller features are the prepared artifact's (train events only); offer features come
  from the catalog snapshot through the same code serving uses (:mod:`ranking.features`).

Each retrieved product is expanded into all its offers (one row per seller; a seller-0 row for a
product without offers): the ranker scores (user, product, offer) triples and learns which offer
the user picks as well as which product. An event with a seller labels that offer; an event
without a known seller (or whose seller is not among the offers) labels every offer of the product.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from data_pipelines.schema import EVENT_CODE
from ranking.features import (
    OFFER_FEATURES,
    USER_FEATURES,
    OfferTable,
    candidate_features,
    history_window,
    offer_table_from_serving,
    user_features,
)
from recsys.artifacts import ArtifactError, atomic_artifact, read_manifest
from recsys.config import Config, fingerprint, to_dict
from towers.full_ranking import masked_scores, topk_excluding

PHASES = {
    # phase: (split whose events are the labels, earlier splits = history / exclusions, add missed positives)
    "train": ("val", ("train",), True),
    "test": ("test", ("train", "val"), False),
}
EVENT_NAMES = {v: k for k, v in EVENT_CODE.items()}


class RankerDataError(RuntimeError):
    """The inputs of the ranker data stage are missing or inconsistent."""


# ---------------------------------------------------------------------------------------------- Spark jobs


def label_candidates(
    cands,
    events,
    offers,
    label_weights: dict[str, float],
    n_candidates: int,
    positives=None,
    exclude=None,
):
    """Expand candidates into offers and label them with the later split's events (Spark).

    Every frame may carry a ``phase`` column (lists of several phases in one pass); lists are keyed
    by (phase, user_idx) then.

    Args:
        cands: DataFrame user_idx, product_idx, rank (1..N), score: the retrieved lists.
        events: DataFrame user_idx, product_idx, seller_idx, event of the split that follows the lists.
        offers: DataFrame product_idx, seller_idx (0 = no offer), OFFER_FEATURES.
        label_weights: event name -> label weight.
        n_candidates: N (added missed positives rank below it).
        positives: DataFrame user_idx, product_idx, score[, rank] of the split's positives (rank: the
            product's position in the user's whole-catalog ranking, default N + 1), or None to add none.
        exclude: DataFrame user_idx, product_idx never added as missed positives (already bought).

    Returns:
        DataFrame [phase,] user_idx, product_idx, seller_idx, rank, score, added, event (-1 none),
        label, p_events (bit mask of event codes the user had on the product), OFFER_FEATURES.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    key = ["phase", "user_idx"] if "phase" in cands.columns else ["user_idx"]
    up = [*key, "product_idx"]
    ev = events.select(
        *key[:-1],
        F.col("user_idx").cast("long").alias("user_idx"),
        F.col("product_idx").cast("long").alias("product_idx"),
        F.coalesce(F.col("seller_idx"), F.lit(0)).cast("long").alias("seller_idx"),
        F.col("event").cast("int").alias("event"),
    )
    cands = cands.select(
        *key[:-1], F.col("user_idx").cast("long"), F.col("product_idx").cast("long"), F.col("rank").cast("int"),
        F.col("score").cast("float"), F.lit(False).alias("added"),
    )
    if positives is not None:
        prank = F.col("rank") if "rank" in positives.columns else F.lit(int(n_candidates) + 1)
        miss = positives.select(
            *key[:-1], F.col("user_idx").cast("long"), F.col("product_idx").cast("long"), F.col("score").cast("float"),
            F.greatest(prank, F.lit(int(n_candidates) + 1)).cast("int").alias("rank"),
        ).join(cands.select(*up), up, "left_anti")
        if exclude is not None:
            miss = miss.join(exclude.select(*up), up, "left_anti")
        miss = miss.dropDuplicates(up).select(*up, "rank", "score", F.lit(True).alias("added"))
        cands = cands.unionByName(miss)
    feat_cols = [F.col(c).cast("float").alias(c) for c in OFFER_FEATURES]
    off = offers.select(F.col("product_idx").cast("long"), F.col("seller_idx").cast("long"), *feat_cols)
    rows = cands.join(off, "product_idx", "left").withColumn("seller_idx", F.coalesce(F.col("seller_idx"), F.lit(0)))
    ps = ev.groupBy(*up, "seller_idx").agg(F.max("event").alias("_ps"))
    pl = ev.groupBy(*up).agg(F.max("event").alias("_p"), F.expr("bit_or(shiftleft(1, event))").alias("p_events"))
    rows = rows.join(ps, [*up, "seller_idx"], "left").join(pl, up, "left")
    matched = F.max("_ps").over(Window.partitionBy(*up))
    event = F.when(F.col("_ps").isNotNull(), F.col("_ps")).when(matched.isNull(), F.col("_p"))
    rows = rows.withColumn("event", F.coalesce(event, F.lit(-1)).cast("tinyint"))
    label = F.lit(0.0)
    for name, code in EVENT_CODE.items():
        label = F.when(F.col("event") == code, F.lit(float(label_weights.get(name, 0.0)))).otherwise(label)
    unknown = {n: 1.0 for n in ("price_unknown", "shipping_unknown", "stock_unknown")}
    return rows.select(
        *up, "seller_idx", "rank", "score", "added", "event",
        label.cast("float").alias("label"),
        F.coalesce(F.col("p_events"), F.lit(0)).cast("int").alias("p_events"),
        *[F.coalesce(F.col(c), F.lit(unknown.get(c, 0.0))).cast("float").alias(c) for c in OFFER_FEATURES],
    )


def user_history_counts(events, window: int):
    """Per list: events, purchases and carts among the user's last ``window`` events (Spark).

    Args:
        events: DataFrame [phase,] user_idx, product_idx, event, ts of the splits before the lists.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    key = ["phase", "user_idx"] if "phase" in events.columns else ["user_idx"]
    w = Window.partitionBy(*key).orderBy(F.col("ts").desc(), F.col("product_idx").desc())
    last = events.withColumn("_r", F.row_number().over(w)).where(F.col("_r") <= int(window))
    return last.groupBy(*key).agg(
        F.count(F.lit(1)).alias("n_events"),
        F.sum((F.col("event") == EVENT_CODE["purchase"]).cast("int")).alias("n_purchases"),
        F.sum((F.col("event") == EVENT_CODE["cart"]).cast("int")).alias("n_carts"),
    )


def target_counts(events, target_codes: tuple[int, ...]):
    """Per list: distinct products with a target event (the denominators of Recall / NDCG)."""
    from pyspark.sql import functions as F

    key = ["phase", "user_idx"] if "phase" in events.columns else ["user_idx"]
    return (
        events.where(F.col("event").isin(list(target_codes)))
        .groupBy(*key)
        .agg(F.countDistinct("product_idx").alias("n_targets"))
    )


# ---------------------------------------------------------------------------------------------- driver


def target_codes(cfg: Config) -> tuple[int, ...]:
    return tuple(EVENT_CODE[e] for e in cfg.eval.target_events if e in EVENT_CODE) or (EVENT_CODE["purchase"],)


def load_offer_table(prepared: Path, n_products: int, n_sellers: int) -> OfferTable:
    """Offer features of a prepared artifact, through the serving tables (exactly what a bundle holds)."""
    from retrieval.marketplace import ServingTables

    tmp = Path(tempfile.mkdtemp(prefix="ranker-serving-"))
    try:
        ServingTables.write_from_prepared(prepared, tmp)
        tables = ServingTables.read(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return offer_table_from_serving(tables, n_products, n_sellers)


def offers_arrow(t: OfferTable) -> pa.Table:
    cols: dict[str, Any] = {
        "product_idx": pa.array(t.product_idx.astype(np.int32)),
        "seller_idx": pa.array(t.seller_idx.astype(np.int32)),
        "price": pa.array(t.price.astype(np.float32)),
        "stock": pa.array(t.stock.astype(np.int32)),
        "shipping_days": pa.array(t.shipping_days.astype(np.float32)),
    }
    for j, c in enumerate(OFFER_FEATURES):
        cols[c] = pa.array(t.features[:, j].astype(np.float32))
    return pa.table(cols)


def _csr_pairs(users: np.ndarray, csr: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    indptr, idx = csr
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    return rows, users[rows], idx


def catalog_ranks(uvec: torch.Tensor, pvec: torch.Tensor, exclude: tuple[np.ndarray, np.ndarray], rows: np.ndarray,
                  products: np.ndarray, batch: int = 1024, max_floats: int = 1 << 25,
                  item_bias: torch.Tensor | None = None) -> np.ndarray:
    """1-based position of ``products[i]`` in the whole-catalog ranking of user row ``rows[i]``.

    The ranking is the one retrieval makes (inner product plus ``item_bias`` [P] when given, row 0
    and the user's excluded items skipped), so a missed positive gets the rank the towers really
    gave it (> N).
    """
    out = np.ones(len(rows), np.int64)
    if len(rows) == 0:
        return out
    order = np.argsort(rows, kind="stable")
    rs, ps = rows[order], products[order]
    step = max(1, max_floats // max(pvec.shape[0], 1))
    with torch.no_grad():
        for start, stop, s in masked_scores(uvec, pvec, exclude, batch):
            lo, hi = np.searchsorted(rs, [start, stop])
            if lo == hi:
                continue
            if item_bias is not None:
                s += item_bias
            rl = torch.from_numpy(rs[lo:hi] - start)
            own = s[rl, torch.from_numpy(ps[lo:hi])]
            for c in range(0, hi - lo, step):
                cnt = (s[rl[c : c + step]] > own[c : c + step, None]).sum(1)
                out[order[lo + c : lo + c + len(cnt)]] = cnt.numpy() + 1
    return out


def run(cfg: Config, run_dir: str | Path, prepared: str | Path | None = None, spark=None) -> dict[str, Any]:
    """Build ``RUN_DIR/ranker_data`` from the prepared artifact and the towers in ``RUN_DIR/model``.

    Both phases go through one Spark pass (frames carry a ``phase`` column).

    Args:
        cfg: resolved configuration (``ranking``, ``data``, ``eval.target_events``, ``data.spark``).
        run_dir: run directory with ``model/`` (towers trained on the train split).
        prepared: prepared artifact (default: the one recorded in ``model/model.json``).
        spark: an existing SparkSession (default: ``get_spark(cfg.data.spark)``).

    Returns:
        The manifest: row and list counts per phase, label counts, missed positives added, timings.
    """
    import pandas as pd
    from pyspark.sql import functions as F

    from data_pipelines.spark_session import get_spark
    from retrieval.common import max_history
    from towers.checkpoint import load_towers
    from towers.eval_data import build_queries
    from towers.evaluate import all_vectors, user_vectors

    t0 = time.time()
    timings: dict[str, float] = {}
    tick = [t0]

    def lap(name: str) -> None:
        now = time.time()
        timings[name] = round(now - tick[0], 2)
        tick[0] = now

    run_dir = Path(run_dir)
    try:
        mman = read_manifest(run_dir / "model")
    except ArtifactError as e:
        raise RankerDataError(f"ranker data needs the trained towers: {e} (run `recsys train` first)") from e
    model, desc = load_towers(run_dir / "model")
    prepared = Path(prepared or desc["prepared"])
    read_manifest(prepared)
    shape = model.shape
    L = max_history(desc, cfg.data.max_history)
    H = history_window(L)
    N = int(min(cfg.ranking.candidates, shape.n_products - 1))
    bought = tuple(EVENT_CODE[e] for e in cfg.data.bought_events if e in EVENT_CODE)
    tcodes = target_codes(cfg)
    offers = load_offer_table(prepared, shape.n_products, shape.n_sellers)
    with torch.no_grad():
        pvec = all_vectors(model.product_vectors, shape.n_products)
        pbias = model.product_offsets(torch.arange(shape.n_products))
    pvec_np = pvec.numpy()

    # 1. retrieval with the towers as they stood (NumPy / torch)
    lists: dict[str, dict[str, Any]] = {}
    cand_pdf, user_pdf, pos_pdf, excl_pdf = [], [], [], []
    for phase, (split, earlier, add_missed) in PHASES.items():
        if not (prepared / "examples" / split).exists():
            continue
        q = build_queries(prepared, split, L, None, bought, earlier)
        if add_missed and len(q) > cfg.ranking.max_train_users:
            rows = np.sort(np.random.default_rng(cfg.ranking.seed).choice(len(q), cfg.ranking.max_train_users, replace=False))
            q = q.subset(rows)
        uvec = user_vectors(model, q)
        top, sc = topk_excluding(uvec, pvec, q.exclude, N, cfg.eval.batch_users, item_bias=pbias)
        U, K = top.shape
        ok = np.isfinite(sc).ravel()
        cand_pdf.append(pd.DataFrame({
            "phase": phase,
            "user_idx": np.repeat(q.user_idx, K)[ok],
            "product_idx": top.ravel()[ok],
            "rank": np.tile(np.arange(1, K + 1, dtype=np.int32), U)[ok],
            "score": sc.ravel()[ok].astype(np.float32),
        }))
        user_pdf.append(pd.DataFrame({"phase": phase, "user_idx": q.user_idx.astype(np.int64)}))
        if add_missed:
            r, u, p = _csr_pairs(q.user_idx, q.targets)
            score = ((uvec.numpy()[r] * pvec_np[p]).sum(1) + pbias.numpy()[p]).astype(np.float32) if len(r) else np.zeros(0, np.float32)
            rank = catalog_ranks(uvec, pvec, q.exclude, r, p, cfg.eval.batch_users, item_bias=pbias)
            pos_pdf.append(pd.DataFrame({"phase": phase, "user_idx": u, "product_idx": p, "score": score,
                                         "rank": rank.astype(np.int32)}))
            _, eu, ep = _csr_pairs(q.user_idx, q.exclude)
            excl_pdf.append(pd.DataFrame({"phase": phase, "user_idx": eu, "product_idx": ep}))
        lists[phase] = {"split": split, "earlier": earlier, "q": q, "uvec": uvec.numpy()}
    if not lists:
        raise RankerDataError(f"{prepared}: no val or test examples to build ranker lists from")
    lap("retrieval")

    # 2. labels, offers and user statistics (Spark). The NumPy results reach Spark as Parquet files
    # under the run directory (fast, and visible to a cluster that can write the run directory).
    spark = spark or get_spark(cfg.data.spark)
    inputs = run_dir / f".ranker_data_inputs-{uuid.uuid4().hex[:8]}"
    inputs.mkdir(parents=True)

    def frame(name: str, parts: list, schema: pa.Schema):
        if not parts:
            return None
        t = pa.Table.from_pandas(pd.concat(parts, ignore_index=True), schema=schema, preserve_index=False)
        pq.write_table(t, inputs / f"{name}.parquet")
        return spark.read.parquet(str(inputs / f"{name}.parquet"))

    i64, i32, f32, st = pa.int64(), pa.int32(), pa.float32(), pa.string()
    cands = frame("candidates", cand_pdf, pa.schema([("phase", st), ("user_idx", i64), ("product_idx", i64),
                                                     ("rank", i32), ("score", f32)]))
    users = frame("users", user_pdf, pa.schema([("phase", st), ("user_idx", i64)]))
    positives = frame("positives", pos_pdf, pa.schema([("phase", st), ("user_idx", i64), ("product_idx", i64),
                                                       ("score", f32), ("rank", i32)]))
    exclude = frame("exclude", excl_pdf, pa.schema([("phase", st), ("user_idx", i64), ("product_idx", i64)]))
    off_t = offers_arrow(offers)
    pq.write_table(off_t.select(["product_idx", "seller_idx", *OFFER_FEATURES]), inputs / "offers.parquet")
    off_df = spark.read.parquet(str(inputs / "offers.parquet"))
    lap("spark_frames")

    def split_events(split: str, phase: str):
        return spark.read.parquet(str(prepared / "examples" / split)).select(
            F.lit(phase).alias("phase"), "user_idx", "product_idx", "seller_idx", "event", "ts")

    def union(frames: list):
        out = frames[0]
        for f in frames[1:]:
            out = out.unionByName(f)
        return out

    lap("spark_plan")
    key = ["phase", "user_idx"]
    events = union([split_events(v["split"], ph) for ph, v in lists.items()]).join(users, key)
    hist = [split_events(s, ph) for ph, v in lists.items() for s in v["earlier"] if (prepared / "examples" / s).exists()]
    rows = label_candidates(cands, events, off_df, cfg.ranking.label_weights, N, positives, exclude)
    stats = target_counts(events, tcodes)
    if hist:
        stats = user_history_counts(union(hist).join(users, key), H).join(stats, key, "full")

    manifest: dict[str, Any] = {
        "stage": "ranker_data",
        "prepared": str(prepared.resolve()),
        "model_dir": str((run_dir / "model").resolve()),
        "model_created_at": mman.get("created_at"),
        "vocab_fingerprint": desc.get("vocab_fingerprint"),
        "config": to_dict(cfg),
        "config_fingerprint": fingerprint({"ranking": to_dict(cfg.ranking), "data": to_dict(cfg.data)}),
        "candidates": N,
        "max_history": L,
        "history_window": H,
        "target_events": [EVENT_NAMES[c] for c in tcodes],
        "offer_features": list(OFFER_FEATURES),
        "user_features": list(USER_FEATURES),
        "phases": {},
    }
    out = run_dir / "ranker_data"
    try:
        _write(out, manifest, off_t, rows, stats, lists, H, L, lap, timings, t0)
    finally:
        shutil.rmtree(inputs, ignore_errors=True)
    return read_manifest(out)


def _write(out: Path, manifest: dict[str, Any], off_t: pa.Table, rows, stats, lists: dict[str, Any], H: int, L: int,
           lap, timings: dict[str, float], t0: float) -> None:
    with atomic_artifact(out, manifest) as tmp:
        pq.write_table(off_t, tmp / "offers.parquet")
        rows.sortWithinPartitions("phase", "user_idx", "rank", "seller_idx").write.partitionBy("phase").parquet(
            str(tmp / "candidates"))
        lap("spark_candidates")
        st = stats.toPandas()
        lap("spark_user_stats")
        for phase, v in lists.items():
            manifest["phases"][phase] = _write_users(tmp, phase, v, st, H, L)
        lap("users")
        manifest["seconds"] = round(time.time() - t0, 1)
        manifest["timings"] = timings


def _write_users(root: Path, phase: str, v: dict[str, Any], stats, H: int, L: int) -> dict[str, Any]:
    """``<phase>/users.parquet`` and the phase's counts for the manifest."""
    import pandas as pd

    q, uvec = v["q"], v["uvec"]
    uf = pd.DataFrame({"user_idx": q.user_idx}).merge(
        stats[stats["phase"] == phase].drop(columns="phase"), on="user_idx", how="left")
    for c in ("n_events", "n_purchases", "n_carts", "n_targets"):
        if c not in uf:
            uf[c] = 0
    uf = uf.fillna(0)
    n_ev = uf["n_events"].to_numpy(np.int64)
    feats = user_features(n_ev, uf["n_purchases"].to_numpy(), uf["n_carts"].to_numpy(), H)
    d = uvec.shape[1]
    cols: dict[str, Any] = {
        "user_idx": pa.array(q.user_idx.astype(np.int32)),
        "hour": pa.array(q.hour.astype(np.int8)),
        "dow": pa.array(q.dow.astype(np.int8)),
        "user_vec": pa.FixedSizeListArray.from_arrays(pa.array(uvec.reshape(-1).astype(np.float32)), d),
        "hist_products": pa.FixedSizeListArray.from_arrays(pa.array(q.hist_products.reshape(-1).astype(np.int32)), L),
        "hist_sellers": pa.FixedSizeListArray.from_arrays(pa.array(q.hist_sellers.reshape(-1).astype(np.int32)), L),
        "n_events": pa.array(n_ev.astype(np.int32)),
        "n_targets": pa.array(uf["n_targets"].to_numpy(np.int32)),
    }
    for j, c in enumerate(USER_FEATURES):
        cols[c] = pa.array(feats[:, j])
    (root / phase).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), root / phase / "users.parquet")
    st = ds.dataset(str(root / "candidates" / f"phase={phase}"), format="parquet").to_table(
        columns=["label", "added", "event"])
    lab = np.asarray(st["label"])
    added = np.asarray(st["added"])
    ev = np.asarray(st["event"])
    return {
        "split": v["split"],
        "history_splits": list(v["earlier"]),
        "lists": len(q),
        "rows": int(st.num_rows),
        "labelled_rows": int((lab > 0).sum()),
        "rows_by_event": {EVENT_NAMES[c]: int((ev == c).sum()) for c in EVENT_NAMES},
        "added_rows": int(added.sum()),
        "added_labelled_rows": int((added & (lab > 0)).sum()),
        "users_with_targets": int((uf["n_targets"] > 0).sum()),
    }


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class ListData:
    """Padded candidate lists in memory: user arrays [U, ...] and candidate arrays [U, C, ...].

    ``mask`` marks real rows; ``added`` marks missed positives added for training (never evaluated);
    ``target`` marks rows whose product has a target event (``eval.target_events``) in the split.
    """

    user_idx: np.ndarray
    user_vec: np.ndarray
    hist_products: np.ndarray
    hist_sellers: np.ndarray
    user_num: np.ndarray
    hour: np.ndarray
    dow: np.ndarray
    n_targets: np.ndarray
    product_idx: np.ndarray
    seller_idx: np.ndarray
    cand_num: np.ndarray
    label: np.ndarray
    rank: np.ndarray
    added: np.ndarray
    target: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.user_idx)

    def subset(self, rows: np.ndarray) -> ListData:
        return ListData(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def batch(self, rows: np.ndarray, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Tensors for the model (and ``label``/``mask``), trimmed to the longest list in the batch."""
        rows = np.asarray(rows, np.int64)
        width = max(1, int(self.mask[rows].sum(1).max(initial=1)))
        out = {
            "user_vec": self.user_vec[rows],
            "hist_products": self.hist_products[rows],
            "hist_sellers": self.hist_sellers[rows],
            "user_num": self.user_num[rows],
            "hour": self.hour[rows],
            "dow": self.dow[rows],
            "product_idx": self.product_idx[rows, :width],
            "seller_idx": self.seller_idx[rows, :width],
            "cand_num": self.cand_num[rows, :width],
            "label": self.label[rows, :width],
            "mask": self.mask[rows, :width],
        }
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in out.items()}


def load_lists(data_dir: str | Path, phase: str, n_candidates: int,
               target_mask: int = 1 << EVENT_CODE["purchase"]) -> ListData:
    """Read one phase of ``ranker_data`` into padded lists (rows of a list sorted by rank, seller).

    Args:
        data_dir: ``RUN_DIR/ranker_data``.
        phase: ``train`` or ``test``.
        n_candidates: N (for the rank feature).
        target_mask: bit mask of the event codes that are targets.
    """
    data_dir = Path(data_dir)
    phase_dir = data_dir / phase
    ut = pq.read_table(phase_dir / "users.parquet")
    users = np.asarray(ut["user_idx"], np.int64)
    order = np.argsort(users, kind="stable")
    ut = ut.take(pa.array(order))
    users = users[order]
    U = len(users)

    def fixed(name: str, dtype) -> np.ndarray:
        col = ut[name].combine_chunks()
        width = col.type.list_size
        return np.asarray(col.flatten(), dtype=dtype).reshape(U, width)

    ct = ds.dataset(str(data_dir / "candidates" / f"phase={phase}"), format="parquet").to_table()
    cu = np.asarray(ct["user_idx"], np.int64)
    rank = np.asarray(ct["rank"], np.int64)
    sel = np.asarray(ct["seller_idx"], np.int64)
    o = np.lexsort((sel, rank, cu))
    cu, rank, sel = cu[o], rank[o], sel[o]
    row = np.searchsorted(users, cu)
    if len(cu) and (row.max(initial=0) >= U or not np.array_equal(users[row], cu)):
        raise RankerDataError(f"{phase_dir}: candidate rows for users missing from users.parquet")
    counts = np.bincount(row, minlength=U)
    C = max(1, int(counts.max(initial=1)))
    col = np.arange(len(cu)) - np.repeat(np.cumsum(counts) - counts, counts)

    def grid(values: np.ndarray, dtype, fill=0) -> np.ndarray:
        g = np.full((U, C) + values.shape[1:], fill, dtype=dtype)
        g[row, col] = values
        return g

    offer = np.stack([np.asarray(ct[c], np.float32)[o] for c in OFFER_FEATURES], 1) if len(o) else np.zeros((0, len(OFFER_FEATURES)), np.float32)
    score = np.asarray(ct["score"], np.float32)[o]
    added = np.asarray(ct["added"], bool)[o]
    cand_num = np.concatenate([offer, candidate_features(score, rank, n_candidates, added, row)], 1)
    p_events = np.asarray(ct["p_events"], np.int64)[o]
    return ListData(
        user_idx=users,
        user_vec=fixed("user_vec", np.float32),
        hist_products=fixed("hist_products", np.int64),
        hist_sellers=fixed("hist_sellers", np.int64),
        user_num=np.stack([np.asarray(ut[c], np.float32) for c in USER_FEATURES], 1),
        hour=np.asarray(ut["hour"], np.int64),
        dow=np.asarray(ut["dow"], np.int64),
        n_targets=np.asarray(ut["n_targets"], np.int64),
        product_idx=grid(np.asarray(ct["product_idx"], np.int64)[o], np.int64),
        seller_idx=grid(sel, np.int64),
        cand_num=grid(cand_num, np.float32),
        label=grid(np.asarray(ct["label"], np.float32)[o], np.float32),
        rank=grid(rank, np.int64),
        added=grid(added, bool, False),
        target=grid((p_events & int(target_mask)) != 0, bool, False),
        mask=grid(np.ones(len(o), bool), bool, False),
    )


def read_data_manifest(run_dir: str | Path) -> dict[str, Any]:
    try:
        return read_manifest(Path(run_dir) / "ranker_data")
    except ArtifactError as e:
        raise RankerDataError(f"{e} (run `recsys ranker-data` / ranking.data.run first)") from e


def summary_json(manifest: dict[str, Any]) -> str:
    return json.dumps({k: manifest.get(k) for k in ("candidates", "phases", "seconds")}, indent=2)
