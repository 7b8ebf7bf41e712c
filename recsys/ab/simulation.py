"""Validation of the A/B machinery by simulation: the synthetic marketplace's users play the users.

A :class:`SimWorld` holds the true preferences of the users of a synthetic marketplace
(:func:`data_pipelines.synthetic.oracle_scores` at the end of its period: ``log P(view) +
log P(purchase | view)`` of every product). Each user's scores are standardised over the catalog
(``z``, mean 0, sd 1 per user). A :class:`UserModel` turns a shown list into behaviour with a
position bias (an examination / cascade-free model):

    P(view item at position j) = j^-position_decay * sigmoid(view_bias + view_scale * z)
    P(purchase | view)         = sigmoid(buy_bias + buy_scale * z)

independently per item; a view happens ``Exp(delay_mean_hours)`` after the exposure and a purchase
minutes after its view. Noise the analysis must ignore is added: ``organic_rate`` of users buy
a popularity-drawn product at a random time from 3 days before to 10 days after their exposure (only
the part inside the attribution window counts, and only for ``conversion_any``), and
``pre_period_rate`` of users viewed one of the items they are later shown before the exposure.

Policies map users to lists: ``"oracle"`` (top-k true scores: the good model), ``"noisy:<sd>"``
(true scores plus Gaussian noise of ``sd`` standard deviations: a weaker model), ``"popularity"``
(the same most popular products for everyone), ``"shuffled"`` (the oracle's top-k in random order),
``"random"``, or any callable ``(world, rows, k, rng) -> [n, k] product columns (-1 = empty)``;
:func:`retriever_policy` wraps a two-tower ``retrieval.retriever.Retriever``.

:func:`simulate_ab` runs one experiment through the real code paths: assignment
(:class:`~recsys.ab.assignment.Assigner`), the exposure log (:class:`~recsys.ab.exposure_log.
ExposureLogWriter` + :func:`read_exposures`) and :func:`recsys.ab.analysis.analyze`. It returns the
analysis report with the *true* expected conversion of each variant (computed exactly from the user
model) and the power the planner predicts for that true effect. :func:`power_study` /
:func:`simulate_aa` repeat it over seeds (``python -m recsys.ab.simulation`` prints both).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.ab.analysis import analyze, plan_sample_size, power_two_proportions
from recsys.ab.assignment import Assigner
from recsys.ab.exposure_log import ExposureLogWriter
from recsys.config import ABConfig, ABVariant

Policy = Callable[["SimWorld", np.ndarray, int, np.random.Generator], np.ndarray]
HOUR_S = 3600.0
DAY_S = 86400.0


@dataclass(frozen=True)
class UserModel:
    """How a simulated user reacts to a shown list (see the module docstring)."""

    position_decay: float = 0.8
    view_bias: float = -3.5
    view_scale: float = 0.8
    buy_bias: float = -2.5
    buy_scale: float = 0.5
    delay_mean_hours: float = 24.0
    organic_rate: float = 0.05
    pre_period_rate: float = 0.2

    def probabilities(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P(view) with position bias, P(purchase | view)) for ``z`` of shown lists [n, k]."""
        k = z.shape[1]
        exam = np.arange(1, k + 1, dtype=np.float64) ** -self.position_decay
        pv = exam[None, :] / (1.0 + np.exp(-(self.view_bias + self.view_scale * z)))
        pb = 1.0 / (1.0 + np.exp(-(self.buy_bias + self.buy_scale * z)))
        return pv, pb


@dataclass
class SimWorld:
    """True preferences of a synthetic marketplace's users, in product-id order."""

    user_ids: np.ndarray  # [U] str
    product_ids: np.ndarray  # [P] str, ascending
    seller_ids: np.ndarray  # [P] str: the primary offer's seller
    price: np.ndarray  # [P] list price
    popularity: np.ndarray  # [P] the generator's popularity prior
    z: np.ndarray  # [U, P] float32 standardised true scores (-inf: not released)
    start_s: float  # when the simulated experiment starts (epoch seconds)

    @classmethod
    def from_synthetic(cls, raw_dir: str | Path, n_users: int | None = None, at_time: float | None = None) -> SimWorld:
        """The users of a folder written by ``data_pipelines.synthetic.generate`` (first ``n_users``)."""
        from data_pipelines.synthetic import load_latent, oracle_scores

        w, params = load_latent(raw_dir)
        n = len(w["user_n"]) if n_users is None else min(int(n_users), len(w["user_n"]))
        width = int(params["id_width"]["user"])
        uids = [f"u{i:0{width}d}" for i in range(n)]
        t = params["start_ts"] + params["period_s"] if at_time is None else at_time
        pids, scores = oracle_scores(raw_dir, uids, at_time=t)
        order = np.argsort(w["prod_id_num"])  # product-id order -> internal index
        ws = int(params["id_width"]["seller"])
        seller_num = w["off_seller"][w["off_start"][order]]
        return cls(
            user_ids=np.array(uids, dtype=object),
            product_ids=np.array(pids, dtype=object),
            seller_ids=np.array([f"s{s:0{ws}d}" for s in seller_num], dtype=object),
            price=np.asarray(w["prod_price"][order], np.float64),
            popularity=np.asarray(w["prod_pop"][order], np.float64),
            z=_standardise(scores),
            start_s=float(t),
        )

    @property
    def n_users(self) -> int:
        return len(self.user_ids)


def _standardise(scores: np.ndarray) -> np.ndarray:
    finite = np.isfinite(scores)
    x = np.where(finite, scores, np.nan)
    mu = np.nanmean(x, axis=1, keepdims=True)
    sd = np.nanstd(x, axis=1, keepdims=True)
    z = (x - mu) / np.maximum(sd, 1e-6)
    return np.where(finite, z, -np.inf).astype(np.float32)


# ---------------------------------------------------------------------------------------------- policies


def _topk(s: np.ndarray, k: int) -> np.ndarray:
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    rows = np.arange(len(s))[:, None]
    return part[rows, np.argsort(-s[rows, part], axis=1)]


def policy_oracle(world: SimWorld, rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return _topk(world.z[rows], k)


def policy_noisy(sd: float) -> Policy:
    def fn(world: SimWorld, rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        z = world.z[rows]
        return _topk(z + rng.normal(0.0, sd, z.shape).astype(np.float32), k)

    fn.__name__ = f"noisy:{sd}"
    return fn


def policy_popularity(world: SimWorld, rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    top = np.argsort(-world.popularity, kind="stable")[:k]
    return np.tile(top, (len(rows), 1))


def policy_shuffled(world: SimWorld, rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permuted(policy_oracle(world, rows, k, rng), axis=1)


def policy_random(world: SimWorld, rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    P = len(world.product_ids)
    return np.argsort(rng.random((len(rows), P)), axis=1)[:, :k]


def retriever_policy(retriever: Any, filters: Any = None) -> Policy:
    """A policy from a two-tower ``retrieval.retriever.Retriever`` (its ``recommend_products``);
    products unknown to the world are left empty (-1)."""

    def fn(world: SimWorld, rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        col = {p: i for i, p in enumerate(world.product_ids)}
        users = [str(u) for u in world.user_ids[rows]]
        res = retriever.recommend_products(users, k) if filters is None else retriever.recommend_products(users, k, filters)
        out = np.full((len(rows), k), -1, np.int64)
        for i, r in enumerate(res):
            for j, c in enumerate(r.candidates[:k]):
                out[i, j] = col.get(c.product_id, -1)
        return out

    return fn


def resolve_policy(p: str | Policy) -> Policy:
    if callable(p):
        return p
    if p == "oracle":
        return policy_oracle
    if p == "popularity":
        return policy_popularity
    if p == "shuffled":
        return policy_shuffled
    if p == "random":
        return policy_random
    if p.startswith("noisy:"):
        return policy_noisy(float(p.split(":", 1)[1]))
    raise ValueError(f"unknown policy {p!r} (oracle, noisy:<sd>, popularity, shuffled, random or a callable)")


# ---------------------------------------------------------------------------------------------- truth


def expected_rates(world: SimWorld, lists: np.ndarray, rows: np.ndarray, model: UserModel) -> dict[str, np.ndarray]:
    """Per user: P(purchase of a shown item) and expected clicks, exactly under the user model."""
    z, valid = _list_z(world, lists, rows)
    pv, pb = model.probabilities(z)
    pv = np.where(valid, pv, 0.0)
    p_buy = 1.0 - np.prod(1.0 - pv * pb, axis=1)
    return {"conversion_shown": p_buy, "clicks": pv.sum(axis=1)}


def _list_z(world: SimWorld, lists: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    valid = lists >= 0
    z = world.z[rows[:, None], np.maximum(lists, 0)].astype(np.float64)
    valid &= np.isfinite(z)
    return np.where(valid, z, -30.0), valid


# ---------------------------------------------------------------------------------------------- simulation


def _simulate_events(world: SimWorld, rows: np.ndarray, lists: np.ndarray, t_exp: np.ndarray, model: UserModel,
                     rng: np.random.Generator) -> pd.DataFrame:
    n, k = lists.shape
    z, valid = _list_z(world, lists, rows)
    pv, pb = model.probabilities(z)
    viewed = valid & (rng.random((n, k)) < pv)
    bought = viewed & (rng.random((n, k)) < pb)
    t_view = t_exp[:, None] + rng.exponential(model.delay_mean_hours * HOUR_S, (n, k))
    t_buy = t_view + 60.0 + rng.exponential(600.0, (n, k))
    ui, pj = np.nonzero(viewed)
    bi, bj = np.nonzero(bought)
    users, prods, types, times = [rows[ui], rows[bi]], [lists[ui, pj], lists[bi, bj]], [], []
    types += [np.full(len(ui), "view", object), np.full(len(bi), "purchase", object)]
    times += [t_view[ui, pj], t_buy[bi, bj]]
    # organic purchases (not caused by the list), partly before the exposure or after the window
    org = np.flatnonzero(rng.random(n) < model.organic_rate)
    if len(org):
        cdf = np.cumsum(world.popularity)
        op = np.minimum(np.searchsorted(cdf, rng.random(len(org)) * cdf[-1], side="right"), len(cdf) - 1)
        users.append(rows[org])
        prods.append(op)
        types.append(np.full(len(org), "purchase", object))
        times.append(t_exp[org] + rng.uniform(-3 * DAY_S, 10 * DAY_S, len(org)))
    # views of a to-be-shown item before the exposure (must not count as clicks)
    pre = np.flatnonzero(rng.random(n) < model.pre_period_rate)
    if len(pre):
        users.append(rows[pre])
        prods.append(lists[pre, rng.integers(0, k, len(pre))])
        types.append(np.full(len(pre), "view", object))
        times.append(t_exp[pre] - rng.uniform(60.0, 5 * DAY_S, len(pre)))
    u, p = np.concatenate(users), np.concatenate(prods)
    keep = p >= 0
    u, p = u[keep], p[keep]
    t = np.concatenate(times)[keep]
    return pd.DataFrame({
        "user_id": world.user_ids[u],
        "product_id": world.product_ids[p],
        "event_type": np.concatenate(types)[keep],
        "timestamp": pd.to_datetime(np.round(t).astype(np.int64), unit="s", utc=True),
        "seller_id": world.seller_ids[p],
        "price": world.price[p],
        "quantity": np.ones(len(p), np.int32),
    })


def simulate_ab(
    world: SimWorld,
    policies: Mapping[str, str | Policy],
    weights: Mapping[str, float] | None = None,
    n_users: int | None = None,
    seed: int = 0,
    k: int = 10,
    model: UserModel | None = None,
    out_dir: str | Path | None = None,
    window_days: float = 7.0,
    exposure_days: float = 7.0,
    n_boot: int = 0,
    experiment: str = "sim",
    alpha: float = 0.05,
    rotate_mb: float = 64.0,
) -> dict[str, Any]:
    """One simulated experiment through assignment, the exposure log and the analysis.

    Args:
        world: the simulated users.
        policies: ``{variant: policy}``; the first is the control.
        weights: ``{variant: weight}`` (default equal).
        n_users: users in the experiment (a random subset of the world's; default all).
        seed: randomness of the user subset, the assignment salt, exposure times and behaviour.
        k: list length.
        model: the user model (default :class:`UserModel`).
        out_dir: keep the exposure log, events and report here (default: a temporary folder).
        window_days: the analysis' attribution window.
        exposure_days: exposures are spread uniformly over this many days.
        n_boot: bootstrap resamples in the analysis (0 = delta-method CIs only: fast).

    Returns:
        ``{"report": analysis report, "truth": {variant: {"conversion_shown": expected rate}},
        "expected_power": {treatment: planner power for the true effect at the realised sizes},
        "p_values": {treatment: conversion_shown p-value}, "lift": {...}}``
    """
    model = model or UserModel()
    rng = np.random.default_rng(seed)
    names = list(policies)
    weights = weights or {n: 1.0 for n in names}
    ab = ABConfig(experiment=experiment, salt=f"sim-{seed}",
                  variants=tuple(ABVariant(name=n, weight=float(weights[n])) for n in names))
    rows = np.arange(world.n_users)
    if n_users is not None and n_users < world.n_users:
        rows = np.sort(rng.choice(world.n_users, n_users, replace=False))
    assigned = Assigner.from_config(ab).assign_many(world.user_ids[rows])
    lists = np.full((len(rows), k), -1, np.int64)
    truth: dict[str, dict[str, float]] = {}
    for n in names:
        m = assigned == n
        if m.any():
            lists[m] = resolve_policy(policies[n])(world, rows[m], k, rng)
            r = expected_rates(world, lists[m], rows[m], model)
            truth[n] = {"conversion_shown": float(r["conversion_shown"].mean()), "users": int(m.sum()),
                        "ctr": float(r["clicks"].sum() / max(int((lists[m] >= 0).sum()), 1))}
    t_exp = world.start_s + rng.uniform(0.0, exposure_days * DAY_S, len(rows))
    events = _simulate_events(world, rows, lists, t_exp, model, rng)

    with tempfile.TemporaryDirectory(prefix="ab-sim-") as tmp:
        base = Path(out_dir) if out_dir is not None else Path(tmp)
        log_dir = base / "exposures"
        if log_dir.exists() and any(log_dir.glob("exposures-*.jsonl")):
            raise ValueError(f"{log_dir} already holds an exposure log; give simulate_ab an empty out_dir")
        order = np.argsort(t_exp, kind="stable")
        with ExposureLogWriter(log_dir, rotate_mb=rotate_mb, batch_lines=2048, flush_interval_s=0) as w:
            for i in order:
                items = [{"product_id": world.product_ids[c], "seller_id": world.seller_ids[c]} for c in lists[i] if c >= 0]
                w.log_exposure(f"{experiment}-{seed}-{i}", world.user_ids[rows[i]], experiment, assigned[i], items,
                               bundle_version=f"sim-{assigned[i]}", timestamp=float(t_exp[i]))
        if out_dir is not None:
            events.to_parquet(base / "events.parquet", index=False)
        report = analyze(log_dir, events, out_dir=(base / "report") if out_dir is not None else None,
                         window_days=window_days, experiment=experiment, control=names[0], ab=ab, alpha=alpha,
                         n_boot=n_boot, seed=seed)
    control = names[0]
    expected_power, p_values, lifts = {}, {}, {}
    for n in names[1:]:
        if n in truth and control in truth:
            expected_power[n] = power_two_proportions(truth[control]["conversion_shown"], truth[n]["conversion_shown"],
                                                      truth[control]["users"], truth[n]["users"], alpha)
        comp = report["comparisons"].get(n, {}).get("conversion_shown", {})
        p_values[n] = comp.get("p_value")
        lifts[n] = comp.get("lift")
    return {"report": report, "truth": truth, "expected_power": expected_power, "p_values": p_values, "lift": lifts,
            "events": len(events)}


def simulate_aa(world: SimWorld, policy: str | Policy = "oracle", **kwargs: Any) -> dict[str, Any]:
    """An A/A experiment: both variants serve ``policy``; any significant difference is a false positive."""
    return simulate_ab(world, {"control": policy, "treatment": policy}, **kwargs)


def power_study(world: SimWorld, policies: Mapping[str, str | Policy], seeds: int | list[int] = 20,
                alpha: float = 0.05, metric: str = "conversion_shown", **kwargs: Any) -> dict[str, Any]:
    """Repeat :func:`simulate_ab` over seeds; the share of seeds with ``p < alpha`` and a lift in the
    true direction (the empirical power; the false-positive rate for an A/A pair), next to the
    planner's expected power for the true effect.

    Returns:
        ``{"seeds", "detected" (share), "rejected" (share with p < alpha, any direction),
        "expected_power" (mean over seeds), "truth" (mean rates), "p_values", "plan"}`` for the first
        treatment (the second policy).
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    names = list(policies)
    treat, control = names[1], names[0]
    ps, detected, rejected, powers, rates_c, rates_t = [], 0, 0, [], [], []
    for s in seed_list:
        r = simulate_ab(world, policies, seed=s, alpha=alpha, **kwargs)
        comp = r["report"]["comparisons"][treat][metric]
        p = comp["p_value"]
        p = 1.0 if p is None else p
        ps.append(p)
        tc, tt = r["truth"][control]["conversion_shown"], r["truth"][treat]["conversion_shown"]
        rates_c.append(tc)
        rates_t.append(tt)
        powers.append(r["expected_power"].get(treat, float("nan")))
        if p < alpha:
            rejected += 1
            if (comp["diff"] or 0.0) * (tt - tc) > 0:
                detected += 1
    pc, pt = float(np.mean(rates_c)), float(np.mean(rates_t))
    plan = None
    if pc > 0 and abs(pt / pc - 1) > 1e-9 and 0 < pt < 1:
        plan = plan_sample_size(pc, pt / pc - 1, alpha=alpha, power=0.8)
    n = len(seed_list)
    return {"seeds": n, "detected": detected / n, "rejected": rejected / n,
            "expected_power": float(np.mean(powers)) if powers else float("nan"),
            "truth": {control: pc, treat: pt}, "p_values": ps, "plan": plan,
            "binomial_se": math.sqrt(max(rejected / n * (1 - rejected / n), 1e-12) / n)}


def _main(argv: list[str] | None = None) -> int:
    """``python -m recsys.ab.simulation``: an A/B power study and an A/A false-positive study."""
    import argparse
    import json

    from data_pipelines.synthetic import generate

    ap = argparse.ArgumentParser(description="Validate the A/B machinery on the synthetic marketplace")
    ap.add_argument("--raw", help="a generated synthetic folder (default: the tiny preset, seed 7, in a temp dir)")
    ap.add_argument("--seeds", type=int, default=20, help="A/B seeds")
    ap.add_argument("--aa-seeds", type=int, default=100, help="A/A seeds")
    ap.add_argument("--users", type=int, default=None, help="users per A/B experiment (default: all)")
    ap.add_argument("--aa-users", type=int, default=400, help="users per A/A experiment")
    ap.add_argument("--k", type=int, default=5, help="list length")
    ap.add_argument("--control", default="noisy:0.75", help="the weaker policy")
    ap.add_argument("--treatment", default="oracle", help="the better policy")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(a.raw) if a.raw else Path(tmp) / "raw"
        if not a.raw:
            generate(raw, preset="tiny", seed=7)
        world = SimWorld.from_synthetic(raw)
        ab = power_study(world, {"control": a.control, "treatment": a.treatment}, a.seeds, n_users=a.users, k=a.k)
        aa = power_study(world, {"control": a.treatment, "treatment": a.treatment}, a.aa_seeds, n_users=a.aa_users,
                         k=a.k)
    out = {"ab": {k: v for k, v in ab.items() if k != "p_values"},
           "aa": {k: v for k, v in aa.items() if k not in ("p_values", "plan", "expected_power", "detected")}}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
