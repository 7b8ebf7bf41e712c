"""``recsys report``: one self-contained HTML page (and a Markdown summary) for a run directory.

Reads whatever the run directory holds (every input is optional; missing ones are left out)::

    RUN_DIR/eval/report.json           towers/evaluate.py: models -> {products, sellers} -> metrics, slices
    RUN_DIR/ranker_eval/report.json    ranking/evaluate.py: ranker vs retrieval order (with bootstrap CIs)
    RUN_DIR/logs/towers/metrics.csv    Lightning CSVLogger: train/loss_epoch, val/recall@K per epoch
    RUN_DIR/index/manifest.json        FAISS indexes: factory, recall@K, settings, tuning, latency if any
    RUN_DIR/prepared/manifest.json     row counts per split, rejected rows by reason
    RUN_DIR/stages.json                stage timings of ``recsys fit``
    RUN_DIR/model/model.json           "mlflow": {tracking_uri, run_id}: the report is logged there

and writes ``RUN_DIR/report/report.html`` (PNG plots embedded as base64), ``report.md`` and
``plots/*.png``. With ``compare`` runs the main tables get one row per run and a plot compares
their Recall@K curves. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("products", "sellers")
MODEL_ORDER = ("two_tower", "ranker", "retrieval_order", "spark_als", "als", "popularity")
_AT = re.compile(r"^(?P<name>[a-z_]+)@(?P<k>\d+)$")


# ---------------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        if path.exists():
            log.warning("report: cannot read %s: %s", path, e)
        return None
    return data if isinstance(data, dict) else None


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def _metric_key(k: str) -> tuple[int, int, str]:
    """Column order: recall, hit, ndcg, mrr, coverage, avg_pop; by K within a family."""
    fam = ["recall", "hit", "ndcg", "mrr", "coverage", "avg_pop"]
    m = _AT.match(k)
    name, kk = (m.group("name"), int(m.group("k"))) if m else (k, 0)
    return (fam.index(name) if name in fam else len(fam), kk, k)


def load_eval(run_dir: Path) -> dict[str, Any] | None:
    return _read_json(run_dir / "eval" / "report.json")


def ranker_rows(rep: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Models from ``ranker_eval/report.json`` as ``{model: {"products": metrics}}`` (defensive about format)."""
    if not rep:
        return {}
    if isinstance(rep.get("models"), dict):
        return {f"ranker:{k}" if k in MODEL_ORDER and k != "ranker" else k: v for k, v in rep["models"].items()
                if isinstance(v, dict)}
    block = rep.get("all")
    if isinstance(block, dict):  # ranking/evaluate.py: metric -> {ranker, retrieval, lift, ci}
        ranker = {m: r.get("ranker") for m, r in block.items() if isinstance(r, dict)}
        retr = {m: r.get("retrieval") for m, r in block.items() if isinstance(r, dict)}
        users = rep.get("users")
        return {"ranker": {"products": {**ranker, "users": users}},
                "retrieval_order": {"products": {**retr, "users": users}}}
    if any(k in rep for k in KINDS):
        return {"ranker": {k: rep[k] for k in KINDS if isinstance(rep.get(k), dict)}}
    flat = {k: v for k, v in rep.items() if _num(v) is not None and (_AT.match(k) or k == "mrr")}
    return {"ranker": {"products": flat}} if flat else {}


def models_table(ev: dict[str, Any] | None, ranker: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, dict]]:
    """``{kind: {model: metrics}}`` from the evaluation report plus the ranker rows, models in a fixed order."""
    models: dict[str, Any] = dict((ev or {}).get("models") or {})
    for name, r in (ranker or {}).items():
        models.setdefault(name, r)
    names = sorted(models, key=lambda n: (MODEL_ORDER.index(n) if n in MODEL_ORDER else
                                          (0.5 if n.startswith("two_tower") else len(MODEL_ORDER)), n))
    out: dict[str, dict[str, dict]] = {}
    for kind in KINDS:
        rows = {n: models[n][kind] for n in names if isinstance(models[n], dict) and isinstance(models[n].get(kind), dict)}
        if rows:
            out[kind] = rows
    return out


def metric_columns(rows: dict[str, dict[str, Any]]) -> list[str]:
    keys: set[str] = set()
    for r in rows.values():
        keys |= {k for k, v in r.items() if _num(v) is not None and k not in ("users", "seconds")}
    return sorted(keys, key=_metric_key)


def curve(metrics: dict[str, Any], family: str) -> tuple[list[int], list[float]]:
    """(K values, metric values) of ``family@K`` keys."""
    pts = []
    for k, v in metrics.items():
        m = _AT.match(k)
        if m and m.group("name") == family and _num(v) is not None:
            pts.append((int(m.group("k")), float(v)))
    pts.sort()
    return [p[0] for p in pts], [p[1] for p in pts]


def read_training_logs(directory: Path) -> dict[str, list[tuple[float, float]]]:
    """The series of a log directory: ``metrics.partN.csv`` (runs before a resume) then ``metrics.csv``;
    a later file's value for an epoch replaces an earlier one."""
    files = sorted(directory.glob("metrics.part*.csv"), key=lambda p: int(p.stem.split("part")[-1] or 0))
    merged: dict[str, dict[float, float]] = {}
    for f in [*files, directory / "metrics.csv"]:
        for col, pts in read_training_log(f).items():
            merged.setdefault(col, {}).update(dict(pts))
    return {c: sorted(v.items()) for c, v in sorted(merged.items())}


def read_training_log(path: Path) -> dict[str, list[tuple[float, float]]]:
    """Per-epoch series from Lightning's CSVLogger ``metrics.csv``: ``{column: [(epoch, value)]}`` for
    ``train/*_epoch`` (or ``train/*`` logged per epoch) and ``val/*`` columns (the last value per epoch)."""
    if not path.exists():
        return {}
    series: dict[str, dict[float, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                epoch = float(row.get("epoch") or "nan")
            except ValueError:
                continue
            if not math.isfinite(epoch):
                continue
            for col, val in row.items():
                if col in ("epoch", "step") or not val or col is None:
                    continue
                if col.endswith("_step"):
                    continue
                try:
                    x = float(val)
                except ValueError:
                    continue
                if math.isfinite(x):
                    series.setdefault(col, {})[epoch] = x
    return {c: sorted(v.items()) for c, v in sorted(series.items())}


def _flat_scalars(d: Any, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(d, dict) or depth > 3:
        return out
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_scalars(v, key + ".", depth + 1))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def index_summary(man: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per index kind: factory, size, recall@K, settings, build time and any latency figures."""
    if not man:
        return []
    idx = man.get("indexes")
    if not isinstance(idx, dict):
        idx = {k: v for k, v in man.items() if isinstance(v, dict) and ("factory" in v or "recall" in v)}
    rows = []
    for kind, info in idx.items():
        if not isinstance(info, dict):
            continue
        row: dict[str, Any] = {"index": kind}
        for k in ("factory", "n", "dim", "recall_k", "recall", "recall_floor", "recall_queries", "build_seconds"):
            if k in info:
                row[k] = info[k]
        if isinstance(info.get("settings"), dict):
            row["settings"] = ", ".join(f"{k}={v}" for k, v in info["settings"].items())
        for k, v in _flat_scalars(info).items():
            if re.search(r"latency|_ms\b|ms_|qps|p50|p95|p99", k) and k not in row:
                row[k] = v
        rows.append(row)
    for k, v in _flat_scalars({kk: vv for kk, vv in man.items() if kk != "indexes"}).items():
        if re.search(r"latency|qps|p50|p95|p99", k):
            rows.append({"index": "(manifest)", k: v})
    return rows


def data_summary(man: dict[str, Any] | None) -> dict[str, Any]:
    """Counts from the prepared manifest: rows per split and output, rejected rows by table and reason."""
    if not man:
        return {}
    out: dict[str, Any] = {}
    rows = man.get("rows") or man.get("row_counts")
    if isinstance(rows, dict):
        out["rows"] = _flat_scalars(rows)
    for k in ("n_users", "n_products", "n_sellers", "n_categories", "n_brands", "has_timestamps"):
        if k in man:
            out.setdefault("sizes", {})[k] = man[k]
    split = man.get("split")
    if isinstance(split, dict):
        out["split"] = {k: v for k, v in _flat_scalars(split).items() if not isinstance(v, str) or len(v) < 80}
    rej = man.get("rejected")
    table: list[tuple[str, str, Any]] = []
    if isinstance(rej, dict):
        for tname, reasons in rej.items():
            if isinstance(reasons, dict):
                for reason, n in reasons.items():
                    table.append((str(tname), str(reason), n))
            elif _num(reasons) is not None:
                table.append((str(tname), "(all)", reasons))
    out["rejected"] = table
    val = man.get("validation")
    if isinstance(val, dict):
        out["validation"] = {t: {k: v for k, v in d.items() if not isinstance(v, dict)} for t, d in val.items()
                             if isinstance(d, dict)}
    return out


# ---------------------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, bottom: float = 0.14) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.9, bottom=bottom, wspace=0.25, hspace=0.45)
    fig.savefig(path, format="png", dpi=80)
    _plt().close(fig)
    return path


def _k_axis(ax, rows: Iterable[dict[str, Any]], family: str) -> None:
    """K on a log scale with ticks only at the evaluated K values (cheap to draw, easy to read)."""
    ks = sorted({k for r in rows for k in curve(r, family)[0]})
    if len(ks) > 1 and ks[0] > 0:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])


def plot_curves(table: dict[str, dict[str, dict]], family: str, path: Path, title: str) -> Path | None:
    plt = _plt()
    kinds = [k for k in KINDS if k in table and any(len(curve(r, family)[0]) >= 1 for r in table[k].values())]
    if not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for model, r in table[kind].items():
            ks, vs = curve(r, family)
            if ks:
                ax.plot(ks, vs, marker="o", label=model)
        _k_axis(ax, table[kind].values(), family)
        ax.set_xlabel("K")
        ax.set_ylabel(f"{family}@K")
        ax.set_title(f"{title}: {kind}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_coverage_popularity(table: dict[str, dict[str, dict]], path: Path) -> Path | None:
    plt = _plt()
    kinds = [k for k in KINDS if k in table]
    series = []
    for kind in kinds:
        cov_keys = sorted({k for r in table[kind].values() for k in r if k.startswith("coverage@")}, key=_metric_key)
        pop = "avg_pop@20"
        if cov_keys or any(pop in r for r in table[kind].values()):
            series.append((kind, cov_keys, pop))
    if not series:
        return None
    fig, axes = plt.subplots(len(series), 2, figsize=(11, 3.6 * len(series)), squeeze=False)
    for row, (kind, cov_keys, pop) in enumerate(series):
        models = [m for m, r in table[kind].items() if any(_num(r.get(c)) is not None for c in (*cov_keys, pop))]
        ax = axes[row][0]
        width = 0.8 / max(len(cov_keys), 1)
        for j, ck in enumerate(cov_keys):
            vals = [_num(table[kind][m].get(ck)) or 0.0 for m in models]
            ax.bar([i + j * width for i in range(len(models))], vals, width=width, label=ck)
        ax.set_xticks([i + width * (len(cov_keys) - 1) / 2 for i in range(len(models))])
        ax.set_xticklabels(models, rotation=20, fontsize=8)
        ax.set_title(f"catalog coverage: {kind}")
        ax.legend(fontsize=8)
        ax = axes[row][1]
        ax.bar(range(len(models)), [_num(table[kind][m].get(pop)) or 0.0 for m in models], color="tab:orange")
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=20, fontsize=8)
        ax.set_title(f"popularity bias ({pop}: mean train count of the top 20): {kind}", fontsize=9)
    return _save(fig, path, bottom=0.2 / len(series))


def plot_slices(table: dict[str, dict[str, dict]], metric: str, path: Path) -> Path | None:
    plt = _plt()
    panels = []
    for kind in KINDS:
        rows = table.get(kind, {})
        slices = sorted({s for r in rows.values() for s in (r.get("slices") or {})})
        if slices:
            panels.append((kind, slices))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (kind, slices) in zip(axes[0], panels, strict=True):
        models = [m for m, r in table[kind].items() if r.get("slices")]
        width = 0.8 / max(len(models), 1)
        for j, m in enumerate(models):
            sl = table[kind][m].get("slices") or {}
            vals = [_num((sl.get(s) or {}).get(metric)) or 0.0 for s in slices]
            ax.bar([i + j * width for i in range(len(slices))], vals, width=width, label=m)
        ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(slices))])
        ax.set_xticklabels(slices, rotation=15, fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} by slice: {kind}")
        ax.legend(fontsize=8)
    return _save(fig, path, bottom=0.2)


def plot_training(series: dict[str, list[tuple[float, float]]], path: Path) -> Path | None:
    plt = _plt()
    loss = {c: v for c, v in series.items() if c.startswith("train/")}  # total loss and per-task losses
    if "train/loss_epoch" in loss:
        loss = {"train/loss_epoch": loss["train/loss_epoch"], **{c: v for c, v in loss.items() if c != "train/loss_epoch"}}
    val = {c: v for c, v in series.items() if c.startswith("val/")}
    if not loss and not val:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), squeeze=False)
    ax = axes[0][0]
    for c, pts in loss.items():
        ax.plot([p[0] + 1 for p in pts], [p[1] for p in pts], marker="o", label=c)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    if loss:
        ax.legend(fontsize=7)
    ax = axes[0][1]
    for c, pts in val.items():
        ax.plot([p[0] + 1 for p in pts], [p[1] for p in pts], marker="o", label=c)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_title("validation")
    ax.grid(alpha=0.3)
    if val:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_compare(runs: list[tuple[str, dict[str, dict[str, dict]]]], path: Path, model: str = "two_tower") -> Path | None:
    plt = _plt()
    kinds = [k for k in KINDS if any(model in t.get(k, {}) for _, t in runs)]
    if not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for name, t in runs:
            r = t.get(kind, {}).get(model)
            if r:
                ks, vs = curve(r, "recall")
                ax.plot(ks, vs, marker="o", label=name)
        _k_axis(ax, [t.get(kind, {}).get(model) or {} for _, t in runs], "recall")
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K")
        ax.set_title(f"{model} across runs: {kind}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- rendering


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"
    if v is None:
        return "–"
    return str(v)


class _Doc:
    """Builds the HTML and the Markdown side by side."""

    def __init__(self, title: str):
        self.title = title
        self.html: list[str] = []
        self.md: list[str] = [f"# {title}", ""]

    def h(self, level: int, text: str) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md += [f"{'#' * level} {text}", ""]

    def p(self, text: str) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md += [text, ""]

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        rows = [list(r) for r in rows]
        th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
        self.html.append(f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>")
        self.md += ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
        self.md += ["| " + " | ".join(_fmt(c).replace("|", "/") for c in r) + " |" for r in rows]
        self.md.append("")

    def image(self, path: Path | None, caption: str, rel_to: Path) -> None:
        if path is None or not path.exists():
            return
        b64 = base64.b64encode(path.read_bytes()).decode()
        self.html.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}"/>'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        self.md += [f"![{caption}]({path.relative_to(rel_to).as_posix()})", ""]

    def render_html(self) -> str:
        css = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
               "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}"
               "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
               "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
               "figcaption{font-size:0.85em;color:#555}h2{border-bottom:1px solid #ddd;margin-top:1.6em}")
        return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>" + html.escape(self.title)
                + f"</title><style>{css}</style></head><body><h1>{html.escape(self.title)}</h1>"
                + "\n".join(self.html) + "</body></html>\n")


def _main_k(cols: list[str], family: str = "recall", prefer: int = 20) -> str | None:
    ks = [int(m.group("k")) for c in cols if (m := _AT.match(c)) and m.group("name") == family]
    if not ks:
        return None
    return f"{family}@{prefer if prefer in ks else min(ks)}"


def _log_mlflow(run_dir: Path, out_dir: Path) -> str | None:
    desc = _read_json(run_dir / "model" / "model.json") or {}
    info = desc.get("mlflow") or {}
    if not info.get("run_id") or not info.get("tracking_uri"):
        return None
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(info["tracking_uri"]).log_artifacts(info["run_id"], str(out_dir), artifact_path="report")
    except Exception as e:  # noqa: BLE001 - the report is written either way
        log.warning("report: could not log to MLflow run %s: %s", info.get("run_id"), e)
        return f"not logged to MLflow ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    return f"logged to MLflow run {info['run_id']} ({info['tracking_uri']}) under artifacts/report"


def run(run_dir: str | Path, compare: Sequence[str | Path] = (), out_dir: str | Path | None = None,
        mlflow: bool = True) -> Path:
    """Write the report of ``run_dir`` (and the comparison with ``compare`` runs).

    Args:
        run_dir: the run directory (every input is optional; at least one must exist).
        compare: other run directories; their main metrics get one row each.
        out_dir: output folder (default ``RUN_DIR/report``).
        mlflow: log the report folder to the run's MLflow run when ``model/model.json`` names one.

    Returns:
        The path of ``report.html`` (``report.md`` and ``plots/`` are next to it).

    Raises:
        FileNotFoundError: ``run_dir`` holds none of the inputs (run ``recsys fit`` first).
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    ev = load_eval(run_dir)
    rk_raw = _read_json(run_dir / "ranker_eval" / "report.json")
    found = [p for p in ("eval/report.json", "ranker_eval/report.json", "logs/towers/metrics.csv",
                         "index/manifest.json", "prepared/manifest.json") if (run_dir / p).exists()]
    if not found:
        raise FileNotFoundError(f"{run_dir}: nothing to report (no eval/report.json, ranker_eval, training logs, "
                                "index or prepared manifest); run `recsys fit` / `recsys evaluate` first")
    table = models_table(ev, ranker_rows(rk_raw))
    doc = _Doc(f"Recommender report: {run_dir.name}")
    if ev is None:
        doc.p(f"Run directory {run_dir.resolve()}: no evaluation report (eval/report.json); run `recsys evaluate`.")
    else:
        doc.p(f"Run directory {run_dir.resolve()}; generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}. "
              f"Evaluation on split '{ev.get('split', '?')}' with {ev.get('users', '?')} users, "
              f"targets: {', '.join(map(str, ev.get('targets') or []))}.")

    # ---- main table
    if table:
        doc.h(2, "Models side by side")
    for kind, rows in table.items():
        cols = metric_columns(rows)
        doc.h(3, kind)
        doc.table(["model", "users", *cols], [[m, r.get("users"), *[_num(r.get(c)) for c in cols]] for m, r in rows.items()])
    if rk_raw and isinstance(rk_raw.get("all"), dict):
        doc.p("The ranker rows come from ranker_eval: the ranker's ordering of the top "
              f"{rk_raw.get('candidates', '?')} retrieved candidates vs the retrieval order, on the same users "
              "(their users differ from the full-catalog evaluation above).")

    # ---- comparison with other runs
    if compare:
        doc.h(2, "Runs compared")
        runs: list[tuple[str, dict[str, dict[str, dict]]]] = [(run_dir.name, table)]
        for c in compare:
            cp = Path(c)
            cev = load_eval(cp)
            if cev is None:
                doc.p(f"{cp}: no eval/report.json; skipped.")
                continue
            name = cp.name if cp.name not in {n for n, _ in runs} else str(cp)
            runs.append((name, models_table(cev, ranker_rows(_read_json(cp / "ranker_eval" / "report.json")))))
        for kind in KINDS:
            for model in ("two_tower", "ranker"):
                rows = {n: t[kind][model] for n, t in runs if model in t.get(kind, {})}
                if not rows:
                    continue
                cols = metric_columns(rows)
                doc.h(3, f"{model}: {kind}")
                doc.table(["run", "users", *cols], [[n, r.get("users"), *[_num(r.get(c)) for c in cols]]
                                                    for n, r in rows.items()])
        doc.image(plot_compare(runs, plots / "compare_recall.png"), "Recall@K of the two-tower model per run", out)

    # ---- curves
    if table:
        doc.h(2, "Recall@K and NDCG@K")
    doc.image(plot_curves(table, "recall", plots / "recall_at_k.png", "Recall@K"), "Recall@K over K", out)
    doc.image(plot_curves(table, "ndcg", plots / "ndcg_at_k.png", "NDCG@K"), "NDCG@K over K", out)

    # ---- coverage / popularity
    if any(c.startswith(("coverage@", "avg_pop")) for rows in table.values() for c in metric_columns(rows)):
        doc.h(2, "Coverage and popularity bias")
    for kind, rows in table.items():
        cols = [c for c in metric_columns(rows) if c.startswith(("coverage@", "avg_pop"))]
        if cols:
            doc.table(["model", *cols], [[f"{m} ({kind})", *[_num(r.get(c)) for c in cols]] for m, r in rows.items()
                                         if any(_num(r.get(c)) is not None for c in cols)])
    doc.image(plot_coverage_popularity(table, plots / "coverage_popularity.png"),
              "Catalog coverage of the top-K lists and mean popularity of the top 20", out)

    # ---- slices
    any_slices = False
    for kind, rows in table.items():
        with_sl = {m: r["slices"] for m, r in rows.items() if isinstance(r.get("slices"), dict) and r["slices"]}
        if not with_sl:
            continue
        if not any_slices:
            doc.h(2, "Slices")
            any_slices = True
        cols = sorted({k for sl in with_sl.values() for s in sl.values() for k, v in s.items()
                       if _num(v) is not None and k != "users"}, key=_metric_key)
        names = sorted({s for sl in with_sl.values() for s in sl})
        doc.h(3, kind)
        doc.table(["slice", "model", "users", *cols],
                  [[s, m, sl[s].get("users"), *[_num(sl[s].get(c)) for c in cols]]
                   for s in names for m, sl in with_sl.items() if s in sl])
    if any_slices:
        main = _main_k(metric_columns(table.get("products") or next(iter(table.values()), {}))) or "recall@20"
        doc.image(plot_slices(table, main, plots / "slices.png"), f"{main} per slice (cold-start items, light / "
                  "heavy / no-history users)", out)

    # ---- ranker with CIs
    if rk_raw and isinstance(rk_raw.get("all"), dict):
        doc.h(2, "Ranker vs retrieval order")
        for block in ("all", "reachable"):
            b = rk_raw.get(block)
            if not isinstance(b, dict):
                continue
            rows = []
            for m, r in b.items():
                if not isinstance(r, dict):
                    continue
                ci = (r.get("ci") or {}).get("lift") or [None, None]
                rows.append([m, _num(r.get("retrieval")), _num(r.get("ranker")), _num(r.get("lift")),
                             f"[{_fmt(_num(ci[0]))}, {_fmt(_num(ci[1]))}]" if len(ci) == 2 else "–",
                             _num(r.get("lift_rel"))])
            doc.h(3, f"{block} users ({rk_raw.get('users' if block == 'all' else 'reachable_users', '?')})")
            doc.table(["metric", "retrieval order", "ranker", "lift", "lift CI", "relative lift"], rows)

    # ---- training
    series = read_training_logs(run_dir / "logs" / "towers")
    if series:
        doc.h(2, "Training curves")
        epochs = sorted({e for pts in series.values() for e, _ in pts})
        cols = [c for c in series if c == "train/loss_epoch" or c.startswith("val/")]
        if cols:
            by = {c: dict(series[c]) for c in cols}
            doc.table(["epoch", *cols], [[int(e) + 1, *[by[c].get(e) for c in cols]] for e in epochs])
        doc.image(plot_training(series, plots / "training.png"), "Training loss and validation metrics per epoch", out)

    # ---- index
    irows = index_summary(_read_json(run_dir / "index" / "manifest.json"))
    if irows:
        doc.h(2, "Retrieval index")
        cols = []
        for r in irows:
            cols += [k for k in r if k not in cols]
        doc.table(cols, [[r.get(c) for c in cols] for r in irows])

    # ---- data
    ds = data_summary(_read_json(run_dir / "prepared" / "manifest.json"))
    if ds:
        doc.h(2, "Data")
        if ds.get("sizes"):
            doc.table(["vocabulary", "size"], list(ds["sizes"].items()))
        if ds.get("rows"):
            doc.table(["rows", "count"], list(ds["rows"].items()))
        if ds.get("validation"):
            keys = sorted({k for v in ds["validation"].values() for k in v})
            doc.table(["table", *keys], [[t, *[v.get(k) for k in keys]] for t, v in ds["validation"].items()])
        if ds.get("rejected"):
            doc.table(["table", "reason", "rejected rows"], ds["rejected"])
        else:
            doc.p("No rejected rows.")
        if ds.get("split"):
            doc.table(["split", "value"], list(ds["split"].items()))

    # ---- stage timings
    stages = _read_json(run_dir / "stages.json")
    if stages:
        rows = [[name, s.get("seconds")] for name, s in stages.items() if isinstance(s, dict) and "seconds" in s]
        if rows:
            doc.h(2, "Stages")
            doc.table(["stage", "seconds"], rows)

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(doc.md))
    html_path = out / "report.html"
    html_path.write_text(doc.render_html())
    if mlflow:
        note = _log_mlflow(run_dir, out)
        if note:
            log.info("report: %s", note)
    return html_path


def _cli(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m recsys.report", description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--compare", action="append", default=[])
    ap.add_argument("--out")
    ap.add_argument("--no-mlflow", action="store_true")
    a = ap.parse_args(argv)
    print(run(a.run, a.compare, a.out, mlflow=not a.no_mlflow))
    return 0


if __name__ == "__main__":
    raise SystemExit(_cli())
