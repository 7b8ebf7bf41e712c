"""Serving-side ranker (no Lightning, no Spark): ``Ranker.load(ranker_dir, bundle_or_run_dir)``.

    r = Ranker.load("runs/x/ranker", "runs/x")          # a run dir, a bundles dir or a bundle dir
    r.rank("u12", [{"product_id": "p3", "seller_id": "s1", "score": 0.8, "rank": 1}, ...],
           {"hour": 20, "dow": 4})                       # -> [(product_id, seller_id, score), ...]
    r.best_sellers("p3", user_id="u12")                  # the product's offers ranked for this user

Ids map to model indexes through the bundle's vocabularies (the ranker refuses a bundle built from
another vocabulary). The user's history (products, sellers, event types) comes from the bundle's
serving tables, the user vector from the two-tower model stored with the ranker (the one its
features were computed with), offer features from the bundle's offers through
:mod:`ranking.features` (the same code that built the training data). One request is one batched
forward pass over all candidate rows.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ranking.features import (
    CANDIDATE_FEATURES,
    OFFER_FEATURES,
    USER_FEATURES,
    candidate_features,
    offer_table_from_serving,
    user_features_from_types,
)
from ranking.model import RankerModel, RankerShape

log = logging.getLogger(__name__)
WEIGHTS = "ranker.pt"
DESCRIPTION = "ranker.json"
USER_CACHE = 4096


@dataclass(frozen=True)
class Ranked:
    """One ranked candidate: the chosen offer's seller, the ranker score, the input position (0-based)."""

    product_id: str
    seller_id: str | None
    score: float
    position: int
    price: float | None


class RankerError(RuntimeError):
    """The ranker cannot be loaded or does not match the bundle."""


class UnknownProductError(LookupError):
    """A product id that the bundle's vocabulary does not know."""


_FIELDS = ("product_id", "seller_id", "score", "rank")


def _fields(c: Any) -> tuple[Any, Any, Any, Any]:
    """(product_id, seller_id, score, rank) of a candidate dict or object (missing: None)."""
    if isinstance(c, Mapping):
        return c.get("product_id"), c.get("seller_id"), c.get("score"), c.get("rank")
    return tuple(getattr(c, f, None) for f in _FIELDS)  # type: ignore[return-value]


def _csr_by_user(users: np.ndarray, lens: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr over user indexes, order of flat positions) for histories stored in any row order."""
    row_start = (np.cumsum(lens) - lens).astype(np.int64)
    ok = (users >= 0) & (users < n_users)
    u, st, ln = users[ok], row_start[ok], lens[ok].astype(np.int64)
    lengths = np.zeros(n_users, np.int64)
    lengths[u] = ln
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    o = np.argsort(u, kind="stable")
    st, ln = st[o], ln[o]
    offs = np.cumsum(ln) - ln
    take = np.repeat(st - offs, ln) + np.arange(int(ln.sum()), dtype=np.int64)
    return indptr, take


class Ranker:
    """A loaded ranker bound to one bundle's vocabularies and marketplace tables (thread-safe, read-only)."""

    def __init__(self, model: RankerModel, desc: dict[str, Any], towers, version: str, bundle_path: Path,
                 bundle_manifest: dict[str, Any], trace: bool = True):
        from retrieval.common import read_vocab
        from retrieval.marketplace import ServingTables

        self.model = model.eval()
        self.desc = desc
        self.towers = towers.eval()
        self.version = version
        self.bundle_path = bundle_path
        self.bundle_version = str(bundle_manifest.get("version"))
        self.shape: RankerShape = model.shape
        self.n_candidates = int(desc.get("candidates", 100))
        self.max_history = int(desc.get("max_history", 50))
        self.window = int(desc.get("history_window", 4 * self.max_history))
        ix = {}
        for kind in ("users", "products", "sellers"):
            ids, idx = read_vocab(bundle_path / "vocab" / f"{kind}.parquet")
            ix[kind] = (ids, idx.astype(np.int64))
        # plain dicts: a hundred lookups cost microseconds (a pandas Index costs a millisecond per call)
        self._users = dict(zip(ix["users"][0].tolist(), ix["users"][1].tolist(), strict=True))
        self._products = dict(zip(ix["products"][0].tolist(), ix["products"][1].tolist(), strict=True))
        self._sellers = dict(zip(ix["sellers"][0].tolist(), ix["sellers"][1].tolist(), strict=True))
        sid = np.full(self.shape.n_sellers, None, dtype=object)
        ok = ix["sellers"][1] < self.shape.n_sellers
        sid[ix["sellers"][1][ok]] = ix["sellers"][0][ok]
        self._seller_id = sid
        self._user_cache: OrderedDict[tuple[int, int, int], dict[str, torch.Tensor]] = OrderedDict()
        self._cache_lock = threading.Lock()
        tables = ServingTables.read(bundle_path / "serving")
        self.offers = offer_table_from_serving(tables, self.shape.n_products, self.shape.n_sellers)
        self.seller_rating = np.full(self.shape.n_sellers, np.nan, np.float32)
        okr = (tables.s_idx > 0) & (tables.s_idx < self.shape.n_sellers)
        self.seller_rating[tables.s_idx[okr]] = tables.s_rating[okr]
        n_users = int(max(ix["users"][1].max(initial=0), tables.h_user.max(initial=0))) + 1
        self._h_indptr, take = _csr_by_user(tables.h_user, tables.h_len, n_users)
        self._h_products = tables.h_products[take] if len(take) else np.zeros(0, np.int64)
        hs = tables.h_sellers if len(tables.h_sellers) == len(tables.h_products) else np.zeros_like(tables.h_products)
        ht = tables.h_types if len(tables.h_types) == len(tables.h_products) else np.zeros(len(tables.h_products), np.int8)
        self._h_sellers = hs[take] if len(take) else np.zeros(0, np.int64)
        self._h_types = ht[take] if len(take) else np.zeros(0, np.int8)
        self.product_vecs = model.product_vecs.numpy()
        self.seller_vecs = model.seller_vecs.numpy()
        self._forward = self._compile() if trace else self.model
        self.towers_mismatch = bundle_manifest.get("model_version") != desc.get("towers_model_version")
        if self.towers_mismatch:
            log.warning("bundle %s was built from towers %s, the ranker from %s: retrieval scores come from another "
                        "model than the ranker was trained with", self.bundle_version,
                        bundle_manifest.get("model_version"), desc.get("towers_model_version"))

    # ------------------------------------------------------------------------------------------ loading

    def _compile(self):
        """The model traced with TorchScript (about half the per-call overhead of eager mode for one
        list), checked against eager mode on a probe list; eager mode when tracing fails."""
        import warnings

        n = min(8, self.shape.n_products - 1)
        probe = dict(self.user_inputs(None, {"hour": 12, "dow": 2}))
        probe["product_idx"] = torch.arange(1, n + 1)[None, :]
        probe["seller_idx"] = torch.zeros(1, n, dtype=torch.long)
        probe["cand_num"] = torch.zeros(1, n, self.shape.n_cand_num)
        self._user_cache.clear()
        try:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(self.model, (probe,), strict=False, check_trace=False)
                short = {**probe, **{k: probe[k][:, :3] for k in ("product_idx", "seller_idx", "cand_num")}}
                for b in (probe, short):  # a different list length must give the same scores
                    if not torch.allclose(traced(b), self.model(b), atol=1e-5):
                        raise RuntimeError("traced ranker disagrees with eager mode")
            return traced
        except Exception as e:  # noqa: BLE001 - tracing is an optimisation only
            log.warning("serving the ranker in eager mode (tracing failed: %s)", e)
            return self.model

    @classmethod
    def load(cls, ranker_dir: str | Path, bundle_or_run_dir: str | Path, verify: bool = True,
             trace: bool = True) -> Ranker:
        """Load ``RUN_DIR/ranker`` and bind it to a bundle (a bundle dir, a bundles dir or a run dir).

        Raises:
            RankerError: missing / corrupt ranker, no bundle, or a vocabulary mismatch.
        """
        from recsys.artifacts import ArtifactError, read_manifest
        from retrieval.bundle import BundleError, resolve_bundle_path
        from retrieval.common import model_version
        from towers.checkpoint import load_towers

        ranker_dir = Path(ranker_dir)
        try:
            rman = read_manifest(ranker_dir, verify=verify)
            bpath = resolve_bundle_path(bundle_or_run_dir)
            bman = read_manifest(bpath, verify=verify)
        except (ArtifactError, BundleError) as e:
            raise RankerError(f"cannot load the ranker: {e}") from e
        desc = json.loads((ranker_dir / DESCRIPTION).read_text())
        if desc.get("vocab_fingerprint") != bman.get("vocab_fingerprint"):
            raise RankerError(
                f"ranker {ranker_dir} was trained with vocabulary {desc.get('vocab_fingerprint')}, bundle {bpath} has "
                f"{bman.get('vocab_fingerprint')}: they come from different prepared artifacts"
            )
        current = {"offer": list(OFFER_FEATURES), "user": list(USER_FEATURES), "candidate": list(CANDIDATE_FEATURES)}
        saved = {k: v for k, v in desc.get("features", {}).items() if k in current}
        if saved != current:
            raise RankerError(
                f"ranker {ranker_dir} was trained on features {saved}, this code computes {current}: "
                "retrain it with `recsys train-ranker --run RUN_DIR`"
            )
        model = RankerModel(RankerShape.from_dict(desc["shape"]))
        model.load_state_dict(torch.load(ranker_dir / WEIGHTS, map_location="cpu", weights_only=True))
        towers, _ = load_towers(ranker_dir / "towers")
        return cls(model, desc, towers, model_version(rman, desc), bpath, bman, trace)

    # ------------------------------------------------------------------------------------------ lookups

    def user_index(self, user_id: str | None) -> int:
        return 0 if user_id is None else int(self._users.get(str(user_id), 0))

    def product_indexes(self, product_ids: Sequence[str]) -> np.ndarray:
        g = self._products.get
        return np.fromiter((g(str(p), 0) for p in product_ids), np.int64, len(product_ids))

    def seller_indexes(self, seller_ids: Sequence[str | None]) -> np.ndarray:
        g = self._sellers.get
        return np.fromiter((0 if s is None else g(str(s), 0) for s in seller_ids), np.int64, len(seller_ids))

    def seller_id(self, seller_idx: int) -> str | None:
        s = self._seller_id[int(seller_idx)] if 0 < int(seller_idx) < len(self._seller_id) else None
        return None if s is None else str(s)

    def history(self, user_idx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(products, sellers, event types) of the user, oldest first (empty for unknown users)."""
        if user_idx <= 0 or user_idx >= len(self._h_indptr) - 1:
            z = np.zeros(0, np.int64)
            return z, z, z
        sl = slice(int(self._h_indptr[user_idx]), int(self._h_indptr[user_idx + 1]))
        return self._h_products[sl], self._h_sellers[sl], self._h_types[sl].astype(np.int64)

    def user_inputs(self, user_id: str | None, context: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The user half of a batch (B = 1): vector, padded history, user features, hour, dow.

        Cached by (user, hour, day) (LRU, ``USER_CACHE`` entries): the bundle's histories are fixed.
        """
        hour, dow = _context(context)
        u = self.user_index(user_id)
        key = (u, hour, dow)
        hit = self._user_cache.get(key)
        if hit is not None:
            return hit
        out = self._user_inputs(u, hour, dow)
        with self._cache_lock:
            self._user_cache[key] = out
            while len(self._user_cache) > USER_CACHE:
                self._user_cache.popitem(last=False)
        return out

    def _user_inputs(self, u: int, hour: int, dow: int) -> dict[str, torch.Tensor]:
        hp, hs, ht = self.history(u)
        L = self.max_history
        p = np.zeros((1, L), np.int64)
        s = np.zeros((1, L), np.int64)
        n = min(L, len(hp))
        if n:
            p[0, :n] = hp[-n:]
            s[0, :n] = hs[-n:]
        batch = {
            "user_idx": torch.tensor([u if u < self.towers.shape.n_users else 0]),
            "hist_products": torch.from_numpy(p),
            "hist_sellers": torch.from_numpy(s),
            "hour": torch.tensor([hour]),
            "dow": torch.tensor([dow]),
        }
        with torch.no_grad():
            uvec = self.towers.user_vectors(batch).float()
        return {
            "user_vec": uvec,
            "hist_products": batch["hist_products"],
            "hist_sellers": batch["hist_sellers"],
            "user_num": torch.from_numpy(user_features_from_types(ht, self.window)[None, :]),
            "hour": batch["hour"],
            "dow": batch["dow"],
        }

    # ------------------------------------------------------------------------------------------ scoring

    def score_rows(self, user: dict[str, torch.Tensor], product_idx: np.ndarray, seller_idx: np.ndarray,
                   retrieval_score: np.ndarray, retrieval_rank: np.ndarray) -> np.ndarray:
        """Ranker scores of candidate rows (one forward pass)."""
        if len(product_idx) == 0:
            return np.zeros(0, np.float32)
        cand_num = np.concatenate([
            self.offers.features_of(product_idx, seller_idx),
            candidate_features(retrieval_score, retrieval_rank, self.n_candidates),
        ], 1)
        batch = dict(user)
        batch["product_idx"] = torch.from_numpy(np.asarray(product_idx, np.int64)[None, :])
        batch["seller_idx"] = torch.from_numpy(np.asarray(seller_idx, np.int64)[None, :])
        batch["cand_num"] = torch.from_numpy(cand_num[None, :])
        with torch.inference_mode():
            return self._forward(batch)[0].float().numpy()

    def rank(self, user_id: str | None, candidates: Sequence[Any], context: Mapping[str, Any] | None = None,
             expand_offers: bool | None = None) -> list[tuple[str, str | None, float]]:
        """Order candidates for a user.

        Args:
            user_id: the user (None or unknown: scored from an empty history).
            candidates: dicts or objects with ``product_id`` and optionally ``seller_id``, ``score``
                (retrieval score; default: the two-tower similarity) and ``rank`` (default: position).
            context: ``hour`` (0-23) and ``dow`` (0 = Monday); default: now (UTC).
            expand_offers: score every offer of each product and keep the best one (default: only for
                candidates without a ``seller_id``).

        Returns:
            ``[(product_id, seller_id, score)]`` best first; unknown products come last, in input order,
            with score ``-inf``.
        """
        return [(r.product_id, r.seller_id, r.score) for r in self.rank_detailed(user_id, candidates, context, expand_offers)]

    def rank_detailed(self, user_id: str | None, candidates: Sequence[Any], context: Mapping[str, Any] | None = None,
                      expand_offers: bool | None = None) -> list[Ranked]:
        """Like :meth:`rank`, as :class:`Ranked` items (with input position and the chosen offer's price)."""
        n = len(candidates)
        if n == 0:
            return []
        user = self.user_inputs(user_id, context)
        f = [_fields(c) for c in candidates]
        pids = [str(x[0]) for x in f]
        sids = [x[1] for x in f]
        pidx = self.product_indexes(pids)
        given = np.fromiter((s is not None for s in sids), bool, n)
        sidx = self.seller_indexes(sids)
        scores_in = np.fromiter((np.nan if x[2] is None else float(x[2]) for x in f), np.float64, n)
        ranks_in = np.fromiter((x[3] or (i + 1) for i, x in enumerate(f)), np.int64, n)
        missing = np.isnan(scores_in)
        if missing.any():
            u = user["user_vec"][0].numpy()
            scores_in[missing] = self.product_vecs[pidx[missing]] @ u
        expand = (~given) if expand_offers is None else np.full(n, bool(expand_offers))
        known = pidx > 0
        # rows: one per (candidate, offer) for expanded candidates, one per candidate otherwise
        cand_of, row_p, row_s = [], [], []
        ip = self.offers.indptr
        exp_idx = np.flatnonzero(expand & known)
        if len(exp_idx):
            lens = ip[pidx[exp_idx] + 1] - ip[pidx[exp_idx]]
            starts = ip[pidx[exp_idx]]
            take = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
            cand_of.append(np.repeat(exp_idx, lens))
            row_p.append(self.offers.product_idx[take])
            row_s.append(self.offers.seller_idx[take])
        one = np.flatnonzero(~expand & known)
        cand_of.append(one)
        row_p.append(pidx[one])
        row_s.append(sidx[one])
        cand_of = np.concatenate(cand_of)
        row_p = np.concatenate(row_p)
        row_s = np.concatenate(row_s)
        sc = self.score_rows(user, row_p, row_s, scores_in[cand_of].astype(np.float32), ranks_in[cand_of])
        best = np.full(n, -np.inf, np.float64)
        best_s = sidx.copy()
        if len(sc):
            order = np.lexsort((-sc, cand_of))  # per candidate, best row first
            first = np.concatenate([[True], cand_of[order][1:] != cand_of[order][:-1]])
            rows = order[first]
            best[cand_of[rows]] = sc[rows]
            best_s[cand_of[rows]] = row_s[rows]
        out_order = sorted(range(n), key=lambda i: (-best[i], i))
        orow = self.offers.lookup(pidx, best_s)
        res = []
        for i in out_order:
            s_id = self.seller_id(int(best_s[i])) if (expand[i] or not given[i]) else (None if sids[i] is None else str(sids[i]))
            price = float(self.offers.price[orow[i]]) if orow[i] >= 0 else float("nan")
            res.append(Ranked(pids[i], s_id, float(best[i]), i, None if price != price else price))
        return res

    def best_sellers(self, product_id: str, user_id: str | None = None, k: int = 10,
                     context: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """The sellers offering a product, ranked for the user by the ranker (price, shipping, stock,
        seller quality and the seller tower's affinity are among its inputs).

        Raises:
            UnknownProductError: the product id is not in the vocabulary.
        """
        p = int(self.product_indexes([product_id])[0])
        if p <= 0:
            raise UnknownProductError(f"unknown product_id {product_id!r}")
        sl = self.offers.rows_of_product(p)
        sellers = self.offers.seller_idx[sl]
        if len(sellers) == 0 or (len(sellers) == 1 and sellers[0] == 0):
            return []
        user = self.user_inputs(user_id, context)
        u = user["user_vec"][0].numpy()
        n = len(sellers)
        sc = self.score_rows(user, np.full(n, p), sellers, np.full(n, float(self.product_vecs[p] @ u), np.float32),
                             np.ones(n, np.int64))
        affinity = self.seller_vecs[sellers] @ u
        lowest = self.offers.features[sl][:, 2] > 0
        order = np.lexsort((sellers, -sc))[: max(0, int(k))]
        out = []
        for r, j in enumerate(order, 1):
            o = sl.start + int(j)
            price = float(self.offers.price[o])
            ship = float(self.offers.shipping_days[o])
            stock = int(self.offers.stock[o])
            rating = float(self.seller_rating[sellers[j]])
            out.append({
                "seller_id": self.seller_id(int(sellers[j])),
                "rank": r,
                "score": float(sc[j]),
                "price": None if price != price else price,
                "shipping_days": None if ship != ship else ship,
                "stock": None if stock < 0 else stock,
                "rating": None if rating != rating else rating,
                "seller_affinity": float(affinity[j]),
                "is_lowest_price": bool(lowest[j]),
            })
        return out


def _context(context: Mapping[str, Any] | None) -> tuple[int, int]:
    """(hour, dow) from a request context; missing values are the current UTC time."""
    now = time.gmtime()
    c = context or {}
    hour = c.get("hour")
    dow = c.get("dow")
    hour = now.tm_hour if hour is None else int(hour)
    dow = now.tm_wday if dow is None else int(dow)
    return (hour if 0 <= hour <= 23 else -1), (dow if 0 <= dow <= 6 else -1)
