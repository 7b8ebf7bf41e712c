"""``recsys fit``: every offline stage in order, each writing its artifact under RUN_DIR.

Stages and artifacts::

    raw data ─prepare→ RUN_DIR/prepared ─train→ RUN_DIR/model ─evaluate→ RUN_DIR/eval
                                              └─refit→ RUN_DIR/model_full ─export→ RUN_DIR/export
                                                    ─index→ RUN_DIR/index ─bundle→ RUN_DIR/bundles/<v>
                                                    ─ranker→ RUN_DIR/ranker

A stage is skipped when its artifact exists and its key (a hash of the config sections it reads,
its inputs' fingerprints and the keys of the stages before it) equals the stored one.
``from_stage`` forces that stage and every later one to run.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from recsys.artifacts import MANIFEST, input_fingerprint
from recsys.config import TRAINING_EVAL_KEYS, Config, fingerprint, to_dict

STATE = "stages.json"


@dataclass(frozen=True)
class Stage:
    """One offline stage: its name, the artifact it writes, the config sections it reads, and its body."""

    name: str
    artifact: str
    sections: tuple[str, ...]
    body: Callable[[FitContext], dict[str, Any]]
    # An optional stage's failure is reported and recorded, but does not undo the artifacts that
    # `recommend` and `serve` need (the ranker re-orders; retrieval works without it).
    optional: bool = False
    # For these sections only these keys count in the stage's key (the stage reads no others).
    only: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def config_key(self, cfg: Config) -> dict[str, Any]:
        """The config values this stage's key covers: its sections, narrowed by ``only``."""
        out = {}
        for s in self.sections:
            d = to_dict(getattr(cfg, s))
            out[s] = {k: d[k] for k in self.only[s]} if s in self.only else d
        return out


@dataclass
class FitContext:
    cfg: Config
    run_dir: Path
    data_dir: Path | None
    source: str
    progress: bool
    results: dict[str, Any]

    @property
    def prepared(self) -> Path:
        return self.run_dir / "prepared"


def say(msg: str) -> None:
    print(f"[recsys {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- stage bodies


def _generate(ctx: FitContext) -> dict[str, Any]:
    from data_pipelines import synthetic

    out = ctx.run_dir / "raw"
    summary = synthetic.generate(out, preset=ctx.cfg.data.synthetic_preset, seed=ctx.cfg.data.synthetic_seed)
    ctx.data_dir = out
    return summary


def prepare_data(cfg: Config, source: str, data_dir: Path, out: Path, progress=say) -> dict[str, Any]:
    """Run the data pipeline on a contract directory or a known source layout (adapter).

    Args:
        cfg: resolved configuration (``resolve_source`` has set its data source).
        source: ``contract`` / ``synthetic`` or an adapter name (``lightgcn``, ``olist``, ...).
        data_dir: the raw data directory.
        out: prepared artifact directory to write.
        progress: callback for progress lines.

    Returns:
        The prepared artifact's manifest.
    """
    from data_pipelines import prepare
    from data_pipelines.adapters import read_source
    from data_pipelines.spark_session import get_spark

    tables = None
    if source not in ("contract", "synthetic"):
        d = cfg.data
        order = d.timestamps == "order"  # line positions as timestamps: the split job carves the last
        tables = read_source(get_spark(d.spark), source, str(data_dir),
                             val_last_fraction=d.val_fraction if d.val_carve == "last" and not order else 0.0,
                             seed=d.seed, line_order=order)
    return prepare.run(cfg, str(data_dir), str(out), tables=tables, progress=progress)


def _prepare(ctx: FitContext) -> dict[str, Any]:
    assert ctx.data_dir is not None
    m = prepare_data(ctx.cfg, ctx.source, ctx.data_dir, ctx.prepared)
    return {k: m.get(k) for k in ("row_counts", "rejected", "split", "n_users", "n_products", "n_sellers")}


def _train(ctx: FitContext) -> dict[str, Any]:
    from towers import train

    return train.run(ctx.cfg, ctx.prepared, ctx.run_dir, resume=True, progress=ctx.progress)


def _evaluate(ctx: FitContext) -> dict[str, Any]:
    from towers import evaluate

    report = evaluate.run(ctx.cfg, ctx.run_dir, ctx.prepared, split="test")
    return {m: {w: {k: r[w].get(k) for k in ("recall@20", "ndcg@20")} for w in ("products", "sellers") if w in r}
            for m, r in report["models"].items()}


def _refit(ctx: FitContext) -> dict[str, Any]:
    from towers import train

    manifest = json.loads((ctx.prepared / MANIFEST).read_text())
    method = (manifest.get("split") or {}).get("method", "")
    return train.refit(ctx.cfg, ctx.prepared, ctx.run_dir, include_test=method != "predefined", progress=ctx.progress)


def _export(ctx: FitContext) -> dict[str, Any]:
    from retrieval import export

    m = export.run(ctx.cfg, ctx.run_dir, ctx.prepared)
    return {k: m.get(k) for k in ("counts", "dim", "model_version")}


def _index(ctx: FitContext) -> dict[str, Any]:
    from retrieval import faiss_index

    m = faiss_index.run(ctx.cfg, ctx.run_dir)
    return {k: v for k, v in m.items() if k in ("products", "sellers", "model_version")}


def _bundle(ctx: FitContext) -> dict[str, Any]:
    from retrieval import bundle

    m = bundle.build(ctx.cfg, ctx.run_dir)
    return {k: m.get(k) for k in ("version", "path")}


def _ranker_data(ctx: FitContext) -> dict[str, Any]:
    from ranking import data

    m = data.run(ctx.cfg, ctx.run_dir, ctx.prepared)
    return {k: m.get(k) for k in ("rows", "lists", "splits") if k in m}


def _ranker(ctx: FitContext) -> dict[str, Any]:
    from ranking import train as ranker_train

    return ranker_train.run(ctx.cfg, ctx.run_dir, progress=ctx.progress)


def _ranker_eval(ctx: FitContext) -> dict[str, Any]:
    from ranking import evaluate as ranker_evaluate

    return ranker_evaluate.run(ctx.cfg, ctx.run_dir).get("all", {})


def stages(cfg: Config) -> list[Stage]:
    """The ordered offline stages for this configuration."""
    out = [
        Stage("prepare", "prepared", ("data",), _prepare),
        Stage("train", "model", ("data", "model", "train", "eval"), _train, only={"eval": TRAINING_EVAL_KEYS}),
    ]
    if cfg.train.refit_full:
        out.append(Stage("refit", "model_full", ("data", "model", "train"), _refit))
    # After the refit: with a source-given test split the refit never saw test, so it is the model
    # evaluated (as benchmarks do); otherwise the model trained on the train split is.
    out.append(Stage("evaluate", "eval", ("data", "model", "train", "eval"), _evaluate))
    out += [
        Stage("export", "export", ("data", "model", "train", "retrieval"), _export),
        Stage("index", "index", ("data", "model", "train", "retrieval"), _index),
        Stage("bundle", "bundles", ("data", "model", "train", "retrieval"), _bundle),
    ]
    if cfg.ranking.enabled:
        rk = ("data", "model", "train", "eval", "ranking")
        out += [
            Stage("ranker_data", "ranker_data", rk, _ranker_data, optional=True),
            Stage("ranker", "ranker", rk, _ranker, optional=True),
            Stage("ranker_eval", "ranker_eval", rk, _ranker_eval, optional=True),
        ]
    return out


# ------------------------------------------------------------------------------------------- driver


def resolve_source(cfg: Config, data: str | None) -> tuple[Config, str, Path | None]:
    """Decide where the raw data comes from: ``--data`` (any known layout) overrides the config's source."""
    from data_pipelines.adapters import detect_source

    if data:
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"--data {data}: no such directory")
        source = detect_source(str(path))
        return replace(cfg, data=replace(cfg.data, source=source, path=str(path))), source, path
    if cfg.data.source == "synthetic":
        return cfg, "synthetic", None
    if not cfg.data.path:
        raise FileNotFoundError("no input data: pass --data DIR or set data.path / data.source in the config")
    path = Path(cfg.data.path)
    if not path.exists():
        raise FileNotFoundError(f"data.path {cfg.data.path}: no such directory")
    source = cfg.data.source if cfg.data.source != "contract" else detect_source(str(path))
    return cfg, source, path


def fit(cfg: Config, run_dir: str | Path, data: str | None = None, from_stage: str | None = None,
        progress: bool = False) -> dict[str, Any]:
    """Run every offline stage whose inputs or config changed (or all from ``from_stage``).

    Args:
        cfg: resolved configuration.
        run_dir: the run directory that holds every stage's artifact.
        data: raw data directory; overrides the config's data source.
        from_stage: rerun this stage and all later ones.
        progress: show training progress bars.

    Returns:
        ``{stage: summary}`` for the stages that ran or were skipped (skipped ones say so).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg, source, data_dir = resolve_source(cfg, data)
    ctx = FitContext(cfg, run_dir, data_dir, source, progress, {})
    plan = stages(cfg)
    names = [s.name for s in plan]
    if from_stage is not None and from_stage not in names:
        raise ValueError(f"--from {from_stage}: unknown stage (stages: {', '.join(names)})")
    state_path = run_dir / STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    if source == "synthetic":
        raw = run_dir / "raw"
        key = fingerprint({"preset": cfg.data.synthetic_preset, "seed": cfg.data.synthetic_seed})
        if state.get("generate", {}).get("key") == key and (raw / "generator.json").exists():
            ctx.data_dir = raw
            say(f"generate: up to date ({raw})")
        else:
            say(f"generate: synthetic marketplace preset={cfg.data.synthetic_preset} → {raw}")
            ctx.results["generate"] = _generate(ctx)
            state["generate"] = {"key": key}
    upstream = input_fingerprint([ctx.data_dir]) if ctx.data_dir else ""
    forced = False
    results: dict[str, Any] = {}
    for st in plan:
        key = fingerprint({"sections": st.config_key(cfg), "upstream": upstream, "source": source})
        forced = forced or st.name == from_stage
        done = state.get(st.name, {})
        art = run_dir / st.artifact
        if not forced and done.get("key") == key and ((art / MANIFEST).exists() or (art / "CURRENT").exists()):
            say(f"{st.name}: up to date ({run_dir / st.artifact})")
            results[st.name] = {"skipped": True, **done.get("summary", {})}
        else:
            say(f"{st.name}: running → {run_dir / st.artifact}")
            t0 = time.time()
            try:
                summary = st.body(ctx)
            except Exception as e:
                if not st.optional:
                    raise
                say(f"{st.name}: FAILED ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                    "later optional stages are skipped, retrieval artifacts are unaffected")
                state[st.name] = {"key": None, "failed": f"{type(e).__name__}: {e}"}
                state_path.write_text(json.dumps(state, indent=2, default=str))
                results[st.name] = {"failed": str(e)}
                break
            summary = json.loads(json.dumps(summary, default=str))
            state[st.name] = {"key": key, "seconds": round(time.time() - t0, 1), "summary": summary}
            state_path.write_text(json.dumps(state, indent=2))
            results[st.name] = summary
            say(f"{st.name}: done in {time.time() - t0:.0f}s")
            forced = True  # everything downstream of a rerun stage reruns
        upstream = key
    state_path.write_text(json.dumps(state, indent=2))
    return results
