"""``recsys ab analyze``: join exposures with later events and compare the variants.

Attribution (``window_days``, default 7):

* an event of user ``u`` at time ``t`` belongs to the experiment when ``u`` had an exposure at
  ``t_e <= t <= t_e + window`` (the latest exposure before ``t`` is used); events before a user's
  first exposure never count;
* it is *on a shown item* when the same product was shown to ``u`` at such a ``t_e`` (again the
  latest showing before ``t``); a view of it is a click at that showing's position, a purchase is a
  purchase-through at that position.

Per variant (users are the unit of analysis; a user seen in two variants is excluded and counted):

* ``conversion_shown``: share of users who purchased a shown item; ``conversion_any``: share who
  purchased anything in the window; ``revenue_per_user`` / ``revenue_shown_per_user``: sum of
  ``price * quantity`` of those purchases per exposed user (missing prices count 0);
* ``ctr`` / ``ptr``: clicked (viewed) / purchased impressions over impressions, overall and per
  position 1..K (ratio metrics: delta-method CIs with users as clusters);
* per metric: mean, standard error, normal CI (and a bootstrap-over-users CI when ``n_boot > 0``).

Each treatment vs the control: difference with CI, two-sided p-value (Welch t-test on per-user
values; a delta-method z-test for the ratio metrics), relative lift with a delta-method CI (and a
bootstrap CI when ``n_boot > 0``). Sample-ratio mismatch: chi-square of users per variant against the
configured allocation, flagged when p < 0.001. :func:`plan_sample_size` and
:func:`power_two_proportions` size experiments (two-proportion z-test).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from data_pipelines.schema import EPOCH_UNITS, EVENT_ALIASES, event_alias_key
from recsys.ab.exposure_log import read_exposures
from recsys.config import ABConfig

DAY_NS = 86400 * 10**9
USER_METRICS = ("conversion_shown", "conversion_any", "revenue_per_user", "revenue_shown_per_user")
RATIO_METRICS = ("ctr", "ptr")
SRM_ALPHA = 0.001


# ---------------------------------------------------------------------------------------------- planning


_N = NormalDist()


def _z(q: float) -> float:
    return _N.inv_cdf(q)


def plan_sample_size(baseline_rate: float, relative_lift: float, alpha: float = 0.05, power: float = 0.8,
                     allocation: Sequence[float] = (0.5, 0.5)) -> dict[str, Any]:
    """Users needed to detect a relative lift of a conversion rate (two-sided two-proportion z-test).

    ``n_c = (z_{1-a/2} sqrt(pbar (1 - pbar) (1 + 1/k)) + z_{power} sqrt(p1 (1 - p1) + p2 (1 - p2) / k))^2
    / (p2 - p1)^2`` and ``n_t = k n_c``, with ``p2 = p1 (1 + lift)``, ``k = allocation[1] / allocation[0]``
    and ``pbar = (p1 + k p2) / (1 + k)``.

    Args:
        baseline_rate: the control's conversion rate p1 in (0, 1).
        relative_lift: the effect to detect, e.g. 0.05 for +5% (negative for a drop).
        alpha: two-sided significance level.
        power: probability of detecting the effect.
        allocation: (control, treatment) weights (normalised).

    Returns:
        ``{"control", "treatment", "total", "per_variant"}`` users (``per_variant``: the larger arm;
        both arms are equal under an equal allocation) plus the rates and settings used.
    """
    p1 = float(baseline_rate)
    p2 = p1 * (1.0 + float(relative_lift))
    if not 0 < p1 < 1 or not 0 < p2 < 1:
        raise ValueError(f"rates must lie in (0, 1): baseline {p1}, treatment {p2}")
    if relative_lift == 0:
        raise ValueError("relative_lift must be non-zero")
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError("alpha and power must lie in (0, 1)")
    a_c, a_t = (float(x) for x in allocation)
    if a_c <= 0 or a_t <= 0:
        raise ValueError(f"allocation weights must be > 0, got {allocation}")
    k = a_t / a_c
    pbar = (p1 + k * p2) / (1 + k)
    za, zb = _z(1 - alpha / 2), _z(power)
    num = za * math.sqrt(pbar * (1 - pbar) * (1 + 1 / k)) + zb * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2) / k)
    n_c = math.ceil(num**2 / (p2 - p1) ** 2)
    n_t = math.ceil(k * n_c)
    return {"control": n_c, "treatment": n_t, "total": n_c + n_t, "per_variant": max(n_c, n_t),
            "baseline_rate": p1, "treatment_rate": p2, "relative_lift": float(relative_lift),
            "alpha": alpha, "power": power, "allocation": [a_c / (a_c + a_t), a_t / (a_c + a_t)]}


def power_two_proportions(p_control: float, p_treatment: float, n_control: int, n_treatment: int,
                          alpha: float = 0.05) -> float:
    """Power of the two-sided two-proportion z-test (pooled null variance) at these sizes."""
    p1, p2 = float(p_control), float(p_treatment)
    n1, n2 = float(n_control), float(n_treatment)
    if n1 <= 0 or n2 <= 0:
        return 0.0
    pbar = (n1 * p1 + n2 * p2) / (n1 + n2)
    se0 = math.sqrt(max(pbar * (1 - pbar) * (1 / n1 + 1 / n2), 1e-300))
    se1 = math.sqrt(max(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2, 1e-300))
    d, za = abs(p2 - p1), _z(1 - alpha / 2)
    return float(_N.cdf((d - za * se0) / se1) + _N.cdf((-d - za * se0) / se1))


def minimum_detectable_lift(p_control: float, n_control: int, n_treatment: int, alpha: float = 0.05,
                            power: float = 0.8) -> float | None:
    """Smallest positive relative lift detectable with ``power`` at these sizes (None if none < 10x)."""
    if not 0 < p_control < 1 or n_control <= 0 or n_treatment <= 0:
        return None
    hi = min(10.0, (1 - 1e-9) / p_control - 1)
    if power_two_proportions(p_control, p_control * (1 + hi), n_control, n_treatment, alpha) < power:
        return None
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if power_two_proportions(p_control, p_control * (1 + mid), n_control, n_treatment, alpha) >= power:
            hi = mid
        else:
            lo = mid
    return hi


# ---------------------------------------------------------------------------------------------- reading


def _to_ns(s: pd.Series, what: str) -> np.ndarray:
    """Timestamps (datetime, epoch seconds / milliseconds, or ISO-8601 strings) as int64 ns UTC."""
    if pd.api.types.is_datetime64_any_dtype(s):
        t = pd.to_datetime(s, utc=True)
    elif pd.api.types.is_numeric_dtype(s):
        x = s.astype("float64")
        # seconds, or milli-, micro- or nanoseconds, by the magnitudes the prepare job reads them by
        med = x.abs().median()
        per_second = next((per for smallest, per in EPOCH_UNITS if med >= smallest), 1.0)
        t = pd.to_datetime(x, unit={1e9: "ns", 1e6: "us", 1e3: "ms", 1.0: "s"}[per_second], utc=True)
    else:
        num = pd.to_numeric(s, errors="coerce")
        if num.notna().all() and len(num):
            return _to_ns(num, what)
        t = pd.to_datetime(s, utc=True, errors="coerce", format="ISO8601")
    if t.isna().any():
        raise ValueError(f"{what}: {int(t.isna().sum())} timestamps could not be parsed")
    return t.astype("int64").to_numpy()


def _read_table(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
        dtype = {"user_id": str, "product_id": str, "seller_id": str, "event_type": str}
        return pd.read_csv(path, dtype=dtype, sep="\t" if ".tsv" in name else ",")
    if name.endswith(".parquet"):
        return pd.read_parquet(path)
    raise ValueError(f"{path}: not a CSV or Parquet file")


def read_events(src: str | Path | pd.DataFrame) -> pd.DataFrame:
    """The events table of the raw data contract (user_id, product_id, event_type, timestamp, price,
    quantity; more columns are kept), from a DataFrame, a CSV / Parquet file, a folder of part files,
    or a raw-data folder holding ``events.parquet`` / ``events.csv`` / ``events/``.

    ``event_type`` defaults to ``purchase`` and ``quantity`` to 1 when absent; ``timestamp`` is
    required (attribution needs it); ``price`` may be missing (revenue then counts 0)."""
    if isinstance(src, pd.DataFrame):
        df = src.copy()
        where = "events"
    else:
        p = Path(src)
        where = str(p)
        if p.is_dir():
            for cand in (p / "events.parquet", p / "events.csv", p / "events.csv.gz", p / "events.tsv", p / "events.tsv.gz",
                         p / "events"):
                if cand.exists():
                    p = cand
                    break
        if p.is_dir():
            parts = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith((".", "_"))
                           and q.name.lower().endswith((".parquet", ".csv", ".csv.gz", ".tsv", ".tsv.gz")))
            if not parts:
                raise FileNotFoundError(f"{where}: no CSV or Parquet event files")
            df = pd.concat([_read_table(q) for q in parts], ignore_index=True)
        elif p.is_file():
            df = _read_table(p)
        else:
            raise FileNotFoundError(f"events {where}: no such file or directory")
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in ("user_id", "product_id", "timestamp") if c not in df.columns]
    if missing:
        raise ValueError(f"{where}: events need columns {missing} (raw data contract: user_id, product_id, "
                         "event_type, timestamp, price, quantity)")
    df["user_id"] = df["user_id"].astype(str)
    df["product_id"] = df["product_id"].astype(str)
    if "event_type" in df.columns:
        # the same names as the prepare job accepts (``addtocart``, ``transaction``, ``buy`` ...)
        et = df["event_type"].astype(str).str.strip().str.lower()
        df["event_type"] = et.map({v: EVENT_ALIASES.get(event_alias_key(v), v) for v in et.unique()})
    else:
        df["event_type"] = "purchase"
    df["ts_ns"] = _to_ns(df["timestamp"], f"{where}: timestamp")
    df["price"] = pd.to_numeric(df["price"], errors="coerce") if "price" in df.columns else np.nan
    df["quantity"] = (pd.to_numeric(df["quantity"], errors="coerce").fillna(1.0) if "quantity" in df.columns
                      else 1.0)
    return df


# ---------------------------------------------------------------------------------------------- statistics


def _mean_stats(x: np.ndarray, z: float) -> dict[str, float]:
    n = len(x)
    m = float(x.mean()) if n else float("nan")
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": m, "se": se, "ci_low": m - z * se, "ci_high": m + z * se}


def _ratio_stats(num: np.ndarray, den: np.ndarray, z: float) -> dict[str, float]:
    """Ratio of sums with a delta-method (cluster) standard error: users are the clusters."""
    n = len(num)
    sd = float(den.sum())
    if n == 0 or sd <= 0:
        return {"mean": float("nan"), "se": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    r = float(num.sum()) / sd
    md = sd / n
    if n > 1:
        resid = num - r * den
        se = float(math.sqrt(resid.var(ddof=1) / n) / md)
    else:
        se = float("nan")
    return {"mean": r, "se": se, "ci_low": r - z * se, "ci_high": r + z * se}


def _welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of Welch's t-test of equal means."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return float("nan")
    va, vb = a.var(ddof=1) / na, b.var(ddof=1) / nb
    d = b.mean() - a.mean()
    if va + vb == 0:
        return 1.0 if d == 0 else 0.0
    t = d / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    return float(2 * stats.t.sf(abs(t), df))


def _lift(mc: float, sec: float, mt: float, set_: float, z: float) -> dict[str, float]:
    """Relative lift mt/mc - 1 with a delta-method CI (independent arms)."""
    if not mc or not np.isfinite(mc):
        return {"lift": float("nan"), "lift_ci_low": float("nan"), "lift_ci_high": float("nan")}
    lift = mt / mc - 1.0
    se = math.sqrt((set_ / mc) ** 2 + (mt * sec / mc**2) ** 2)
    return {"lift": lift, "lift_se": se, "lift_ci_low": lift - z * se, "lift_ci_high": lift + z * se}


def _boot_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    n = len(x)
    out = np.empty(n_boot)
    chunk = max(1, int(2e7 // max(n, 1)))
    for b0 in range(0, n_boot, chunk):
        b1 = min(n_boot, b0 + chunk)
        idx = rng.integers(0, n, size=(b1 - b0, n))
        out[b0:b1] = x[idx].mean(axis=1)
    return out


def _boot_ratios(num: np.ndarray, den: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    n = len(num)
    out = np.empty(n_boot)
    chunk = max(1, int(2e7 // max(n, 1)))
    for b0 in range(0, n_boot, chunk):
        b1 = min(n_boot, b0 + chunk)
        idx = rng.integers(0, n, size=(b1 - b0, n))
        d = den[idx].sum(axis=1)
        out[b0:b1] = np.where(d > 0, num[idx].sum(axis=1) / np.maximum(d, 1e-300), np.nan)
    return out


def srm_check(observed: Mapping[str, int], allocation: Mapping[str, float]) -> dict[str, Any]:
    """Chi-square test of users per variant against the allocation; ``flag`` when p < 0.001."""
    names = [n for n in allocation if allocation[n] > 0]
    unexpected = sorted(set(observed) - set(names))
    obs = np.array([observed.get(n, 0) for n in names], dtype=float)
    w = np.array([allocation[n] for n in names], dtype=float)
    total = obs.sum()
    out: dict[str, Any] = {"observed": {n: int(o) for n, o in zip(names, obs, strict=True)},
                           "expected_share": {n: float(x) for n, x in zip(names, w / w.sum(), strict=True)},
                           "unexpected_variants": unexpected}
    if len(names) < 2 or total == 0:
        out.update(chi2=float("nan"), p_value=float("nan"), flag=bool(unexpected))
        return out
    exp = total * w / w.sum()
    chi2, p = stats.chisquare(obs, exp)
    out.update(chi2=float(chi2), p_value=float(p), threshold=SRM_ALPHA, flag=bool(p < SRM_ALPHA or unexpected))
    return out


# ---------------------------------------------------------------------------------------------- analysis


def _group_codes(left: Sequence[np.ndarray], right: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Dense integer codes of the key tuples of two tables (equal tuples, equal codes)."""
    nl = len(left[0])
    g = np.zeros(nl + len(right[0]), dtype=np.int64)
    for a, b in zip(left, right, strict=True):
        codes, uniq = pd.factorize(np.concatenate([np.asarray(a, dtype=object), np.asarray(b, dtype=object)]))
        g = g * (len(uniq) + 1) + codes
        g = pd.factorize(g)[0].astype(np.int64)
    return g[:nl], g[nl:]


def _attribute(ev_keys: Sequence[np.ndarray], ev_t: np.ndarray, ex_keys: Sequence[np.ndarray], ex_t: np.ndarray,
               window_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """Match each event to the latest exposure with equal keys at or before it, within the window.

    Returns:
        (event rows, exposure rows) of the matched pairs.
    """
    if len(ev_t) == 0 or len(ex_t) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ge, gx = _group_codes(ev_keys, ex_keys)
    times, rank = np.unique(np.concatenate([ev_t, ex_t]), return_inverse=True)
    R = np.int64(len(times))
    ce = ge * R + rank[: len(ev_t)]
    cx = gx * R + rank[len(ev_t):]
    order = np.argsort(cx, kind="stable")
    cxs = cx[order]
    pos = np.searchsorted(cxs, ce, side="right") - 1
    ok = pos >= 0
    pos = np.maximum(pos, 0)
    xi = order[pos]
    ok &= (gx[xi] == ge) & (ev_t - ex_t[xi] <= window_ns)
    return np.flatnonzero(ok), xi[ok]


def _resolve_experiment(df: pd.DataFrame, experiment: str | None, ab: ABConfig | None) -> str:
    exps = sorted(df["experiment"].dropna().unique().tolist())
    if experiment is None and ab is not None and ab.experiment:
        experiment = ab.experiment
    if experiment is None:
        if len(exps) != 1:
            raise ValueError(f"the exposure log holds experiments {exps}; choose one with experiment=...")
        experiment = exps[0]
    if experiment not in exps:
        raise ValueError(f"experiment {experiment!r} not in the exposure log (it holds {exps})")
    return experiment


def analyze(
    exposures: str | Path | Sequence[str | Path] | pd.DataFrame,
    events: str | Path | pd.DataFrame,
    out_dir: str | Path | None = None,
    window_days: float = 7.0,
    experiment: str | None = None,
    control: str | None = None,
    ab: ABConfig | None = None,
    allocation: Mapping[str, float] | None = None,
    alpha: float = 0.05,
    n_boot: int = 1000,
    max_positions: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Analyse an experiment from its exposure log and the events table (see the module docstring).

    Args:
        exposures: exposure log directory / files, or a DataFrame from :func:`read_exposures`.
        events: events (see :func:`read_events`).
        out_dir: where to write ``report.json`` and ``report.md`` (None: write nothing).
        window_days: attribution window after an exposure.
        experiment: the experiment to analyse (default: ``ab.experiment`` or the only one logged).
        control: the control variant (default: ``control`` if present, else the first configured
            variant, else the first name in sorted order).
        ab: the experiment's configuration: its allocation is the SRM reference.
        allocation: ``{variant: weight}`` overriding ``ab`` (default: equal over the logged variants).
        alpha: significance level of the CIs and of ``significant``.
        n_boot: bootstrap resamples over users for extra CIs (0 = none; delta-method CIs only).
        max_positions: positions reported per variant (1..max_positions).
        seed: bootstrap seed.

    Returns:
        The report dict (also ``report.json`` under ``out_dir``).
    """
    t0 = time.time()
    z = _z(1 - alpha / 2)
    window_ns = int(round(window_days * DAY_NS))
    xdf = exposures if isinstance(exposures, pd.DataFrame) else read_exposures(exposures)
    if xdf.empty:
        raise ValueError("the exposure log is empty")
    experiment = _resolve_experiment(xdf, experiment, ab)
    notes: list[str] = []
    sel = (xdf["experiment"] == experiment).to_numpy()
    x_user = xdf["user_id"].to_numpy(object)[sel].astype(str)
    x_var = xdf["variant"].to_numpy(object)[sel].astype(str)
    x_req = xdf["request_id"].to_numpy(object)[sel]
    x_pos = xdf["position"].to_numpy(np.int64)[sel]
    x_prod = xdf["product_id"].to_numpy(object)[sel]
    x_ts = xdf["timestamp"].to_numpy("datetime64[ns]")[sel]
    if np.isnat(x_ts).any():
        raise ValueError(f"the exposure log has {int(np.isnat(x_ts).sum())} rows without a valid timestamp")
    x_t = x_ts.astype(np.int64)

    # users seen in more than one variant are excluded
    ucodes, uniq_users = pd.factorize(x_user)
    vcodes, uniq_vars = pd.factorize(x_var)
    pairs = np.unique(ucodes.astype(np.int64) * len(uniq_vars) + vcodes)
    n_var_of_user = np.bincount(pairs // len(uniq_vars), minlength=len(uniq_users))
    multi = np.asarray(uniq_users)[n_var_of_user > 1]
    if len(multi):
        notes.append(f"{len(multi)} users were exposed in more than one variant and are excluded")
        keep_x = n_var_of_user[ucodes] == 1
        x_user, x_var, x_req, x_pos, x_prod, x_t = (a[keep_x] for a in (x_user, x_var, x_req, x_pos, x_prod, x_t))
        ucodes, vcodes = ucodes[keep_x], vcodes[keep_x]
    first = np.unique(ucodes, return_index=True)[1]
    user_variant = pd.Series(x_var[first], index=pd.Index(x_user[first], name="user_id"))

    # allocation and control
    cfg_alloc: dict[str, float] | None = None
    if allocation is not None:
        cfg_alloc = {str(k): float(v) for k, v in allocation.items()}
    elif ab is not None and ab.experiment == experiment and ab.variants:
        cfg_alloc = {v.name: float(v.weight) for v in ab.variants}
    observed_names = sorted(set(user_variant.tolist()))
    if cfg_alloc is None:
        cfg_alloc = {n: 1.0 for n in observed_names}
        notes.append("no configured allocation given: the SRM check assumes equal weights over the logged variants")
    s = sum(cfg_alloc.values())
    cfg_alloc = {k: v / s for k, v in cfg_alloc.items()}
    order = [n for n in cfg_alloc if n in observed_names] + [n for n in observed_names if n not in cfg_alloc]
    if control is None:
        control = "control" if "control" in order else order[0]
    if control not in order:
        raise ValueError(f"control variant {control!r} has no exposures (variants: {order})")

    # responses (one per request id) and impressions (one per response and position); responses
    # without items keep their users
    rcodes, _ = pd.factorize(x_req)
    r_first = np.unique(rcodes, return_index=True)[1]
    is_item = x_pos > 0
    ikey = rcodes.astype(np.int64) * (int(x_pos.max(initial=0)) + 1) + x_pos
    i_first = np.unique(np.where(is_item, ikey, -1), return_index=True)[1]
    i_first = i_first[is_item[i_first]]

    # events: attribute to the latest exposure within the window
    ev = read_events(events)
    n_events = len(ev)
    users = user_variant.index
    U = len(users)
    ev_u = users.get_indexer(ev["user_id"])
    keep = ev_u >= 0
    ev_u = ev_u[keep]
    ev_p = ev["product_id"].to_numpy(object)[keep]
    ev_t = ev["ts_ns"].to_numpy(np.int64)[keep]
    ev_type = ev["event_type"].to_numpy(object)[keep]
    ev_rev = (ev["price"].fillna(0.0) * ev["quantity"]).to_numpy(float)[keep]
    x_u = users.get_indexer(x_user)
    resp_u, resp_var = x_u[r_first], x_var[r_first]
    imp_u, imp_pos = x_u[i_first], x_pos[i_first]
    a_ev, _ = _attribute([ev_u], ev_t, [resp_u], x_t[r_first], window_ns)
    s_ev, s_imp = _attribute([ev_u, ev_p], ev_t, [imp_u, x_prod[i_first]], x_t[i_first], window_ns)

    # per-user arrays (users in the order of ``users``)
    ucode_var = pd.Index(order).get_indexer(user_variant.to_numpy())
    a_buy = a_ev[ev_type[a_ev] == "purchase"]
    s_is_buy = ev_type[s_ev] == "purchase"
    s_buy = s_ev[s_is_buy]
    per_user = {
        "conversion_any": (np.bincount(ev_u[a_buy], minlength=U) > 0).astype(float),
        "conversion_shown": (np.bincount(ev_u[s_buy], minlength=U) > 0).astype(float),
        "revenue_per_user": np.bincount(ev_u[a_buy], weights=ev_rev[a_buy], minlength=U),
        "revenue_shown_per_user": np.bincount(ev_u[s_buy], weights=ev_rev[s_buy], minlength=U),
    }
    # impressions with click / purchase flags
    clicked = np.zeros(len(i_first))
    clicked[s_imp[ev_type[s_ev] == "view"]] = 1.0
    bought = np.zeros(len(i_first))
    bought[s_imp[s_is_buy]] = 1.0
    per_user["impressions"] = np.bincount(imp_u, minlength=U).astype(float)
    per_user["clicks"] = np.bincount(imp_u, weights=clicked, minlength=U)
    per_user["purchases_shown"] = np.bincount(imp_u, weights=bought, minlength=U)

    rng = np.random.default_rng(seed)
    variants: dict[str, Any] = {}
    boot: dict[str, dict[str, np.ndarray]] = {}
    max_pos = int(min(max_positions, imp_pos.max(initial=0)))
    uvals: dict[str, dict[str, np.ndarray]] = {}
    for vi, name in enumerate(order):
        in_v = ucode_var == vi
        uv = {k: v[in_v] for k, v in per_user.items()}
        uvals[name] = uv
        met: dict[str, Any] = {}
        boot[name] = {}
        for m in USER_METRICS:
            vals = uv[m]
            met[m] = _mean_stats(vals, z)
            if n_boot > 0 and len(vals) > 1:
                b = _boot_means(vals, n_boot, rng)
                boot[name][m] = b
                met[m]["boot_ci_low"], met[m]["boot_ci_high"] = (float(q) for q in
                                                                 np.nanquantile(b, [alpha / 2, 1 - alpha / 2]))
        den = uv["impressions"]
        for m, col in (("ctr", "clicks"), ("ptr", "purchases_shown")):
            num = uv[col]
            met[m] = _ratio_stats(num[den > 0], den[den > 0], z)
            if n_boot > 0 and (den > 0).sum() > 1:
                b = _boot_ratios(num[den > 0], den[den > 0], n_boot, rng)
                boot[name][m] = b
                met[m]["boot_ci_low"], met[m]["boot_ci_high"] = (float(q) for q in
                                                                 np.nanquantile(b, [alpha / 2, 1 - alpha / 2]))
        positions = []
        imp_in_v = in_v[imp_u]
        for pos in range(1, max_pos + 1):
            sel = imp_in_v & (imp_pos == pos)
            if not sel.any():
                continue
            dn = np.bincount(imp_u[sel], minlength=U).astype(float)
            has = dn > 0
            c = _ratio_stats(np.bincount(imp_u[sel], weights=clicked[sel], minlength=U)[has], dn[has], z)
            p = _ratio_stats(np.bincount(imp_u[sel], weights=bought[sel], minlength=U)[has], dn[has], z)
            positions.append({"position": pos, "impressions": int(dn.sum()),
                              "ctr": c["mean"], "ctr_ci_low": c["ci_low"], "ctr_ci_high": c["ci_high"],
                              "ptr": p["mean"], "ptr_ci_low": p["ci_low"], "ptr_ci_high": p["ci_high"]})
        variants[name] = {
            "users": int(in_v.sum()),
            "responses": int((resp_var == name).sum()),
            "impressions": int(imp_in_v.sum()),
            "allocation": cfg_alloc.get(name, 0.0),
            "metrics": met,
            "positions": positions,
        }

    comparisons: dict[str, Any] = {}
    uc = uvals[control]
    for name in order:
        if name == control:
            continue
        ut = uvals[name]
        comp: dict[str, Any] = {}
        for m in (*USER_METRICS, *RATIO_METRICS):
            c, t = variants[control]["metrics"][m], variants[name]["metrics"][m]
            diff = t["mean"] - c["mean"]
            se = math.sqrt(c["se"] ** 2 + t["se"] ** 2) if np.isfinite(c["se"]) and np.isfinite(t["se"]) else float("nan")
            if m in USER_METRICS:
                p = _welch_p(uc[m], ut[m])
                test = "welch_t"
            else:
                p = float(2 * (1 - _N.cdf(abs(diff) / se))) if se and np.isfinite(se) and se > 0 else float("nan")
                test = "delta_z"
            row = {"control": c["mean"], "treatment": t["mean"], "diff": diff, "diff_ci_low": diff - z * se,
                   "diff_ci_high": diff + z * se, "p_value": p, "test": test,
                   "significant": bool(np.isfinite(p) and p < alpha),
                   **_lift(c["mean"], c["se"], t["mean"], t["se"], z)}
            if m in boot.get(control, {}) and m in boot.get(name, {}):
                bc, bt = boot[control][m], boot[name][m]
                with np.errstate(divide="ignore", invalid="ignore"):
                    bl = bt / bc - 1.0
                bl = bl[np.isfinite(bl)]
                if len(bl):
                    lo, hi = np.quantile(bl, [alpha / 2, 1 - alpha / 2])
                    row["lift_boot_ci_low"], row["lift_boot_ci_high"] = float(lo), float(hi)
            comp[m] = row
        pc = variants[control]["metrics"]["conversion_shown"]["mean"]
        comp["mde_relative_conversion_shown"] = minimum_detectable_lift(pc, variants[control]["users"],
                                                                        variants[name]["users"], alpha)
        comparisons[name] = comp

    srm = srm_check({n: variants[n]["users"] for n in order}, cfg_alloc)
    if srm.get("flag"):
        notes.append("SAMPLE RATIO MISMATCH: users per variant differ from the allocation (p < 0.001) or "
                     "unexpected variants were logged; the comparison is not trustworthy until explained")
    report: dict[str, Any] = {
        "experiment": experiment,
        "control": control,
        "variants_order": order,
        "window_days": window_days,
        "alpha": alpha,
        "n_boot": n_boot,
        "exposures": {"responses": int(len(r_first)), "impressions": int(len(i_first)), "users": int(U),
                      "users_in_multiple_variants": int(len(multi)), "files": xdf.attrs.get("files"),
                      "bad_lines": xdf.attrs.get("bad_lines")},
        "events": {"rows": int(n_events), "of_exposed_users": int(len(ev_u)),
                   "attributed": int(len(a_ev)), "attributed_purchases": int(len(a_buy)),
                   "on_shown_items": int(len(s_ev)), "purchases_of_shown_items": int(len(s_buy))},
        "srm": srm,
        "variants": variants,
        "comparisons": comparisons,
        "notes": notes,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - t0, 3),
    }
    report = _clean(report)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "report.md").write_text(markdown(report))
        report["out_dir"] = str(out)
    return report


def _clean(o: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN / inf to None."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, (int, np.integer)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    return o


def _f(v: Any, pct: bool = False, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    if pct:
        return f"{100 * v:+.2f}%"
    return f"{v:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The A/B report as Markdown."""
    r = report
    lines = [f"# A/B experiment `{r['experiment']}`", "",
             f"Control: `{r['control']}`; attribution window {r['window_days']} days; alpha {r['alpha']}; "
             f"{r['exposures']['users']} users, {r['exposures']['responses']} responses, "
             f"{r['exposures']['impressions']} impressions.", ""]
    srm = r["srm"]
    lines += ["## Sample ratio", "", f"chi-square p = {_f(srm.get('p_value'))} "
              f"({'**MISMATCH**' if srm.get('flag') else 'ok'}); observed {srm['observed']}, "
              f"expected shares { {k: round(v, 4) for k, v in srm['expected_share'].items()} }"
              + (f"; unexpected variants {srm['unexpected_variants']}" if srm["unexpected_variants"] else ""), ""]
    names = r["variants_order"]
    lines += ["## Variants", "", "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines.append("| users | " + " | ".join(str(r["variants"][n]["users"]) for n in names) + " |")
    for m in (*USER_METRICS, *RATIO_METRICS):
        cells = []
        for n in names:
            s = r["variants"][n]["metrics"][m]
            cells.append(f"{_f(s['mean'])} [{_f(s['ci_low'])}, {_f(s['ci_high'])}]")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, comp in r["comparisons"].items():
        lines += [f"## `{name}` vs `{r['control']}`", "",
                  "| metric | control | treatment | diff [CI] | lift [CI] | p-value | significant |",
                  "|---|---|---|---|---|---|---|"]
        for m in (*USER_METRICS, *RATIO_METRICS):
            c = comp[m]
            lines.append(f"| {m} | {_f(c['control'])} | {_f(c['treatment'])} | {_f(c['diff'])} "
                         f"[{_f(c['diff_ci_low'])}, {_f(c['diff_ci_high'])}] | {_f(c['lift'], True)} "
                         f"[{_f(c['lift_ci_low'], True)}, {_f(c['lift_ci_high'], True)}] | {_f(c['p_value'])} | "
                         f"{'yes' if c['significant'] else 'no'} |")
        mde = comp.get("mde_relative_conversion_shown")
        lines += ["", f"Minimum detectable relative lift of conversion_shown at 80% power: {_f(mde, True)}", ""]
    lines += ["## Click- and purchase-through by position", ""]
    for n in names:
        pos = r["variants"][n]["positions"]
        if not pos:
            continue
        lines += [f"### `{n}`", "", "| position | impressions | CTR [CI] | PTR [CI] |", "|---|---|---|---|"]
        for p in pos:
            lines.append(f"| {p['position']} | {p['impressions']} | {_f(p['ctr'])} [{_f(p['ctr_ci_low'])}, "
                         f"{_f(p['ctr_ci_high'])}] | {_f(p['ptr'])} [{_f(p['ptr_ci_low'])}, {_f(p['ptr_ci_high'])}] |")
        lines.append("")
    if r["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(lines)
