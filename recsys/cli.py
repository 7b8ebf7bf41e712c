"""The ``recsys`` console script: one subcommand per stage, each a thin call into a typed ``run``.

Errors print one line and a hint; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from recsys.config import Config, ConfigError, load_config

HINTS = {
    "ConfigError": "check the key names and types against configs/defaults/*.yaml",
    "DataContractError": "see the raw data contract in README.md",
    "JavaNotFoundError": "Spark needs Java 17; set JAVA_HOME",
    "ArtifactError": "rerun the stage that writes this artifact (recsys fit reruns what is missing)",
    "FileNotFoundError": "check the path",
    "BundleError": "rebuild the bundle with `recsys bundle --run RUN_DIR`",
    "RecallFloorError": "choose a more exact index (retrieval.index_factory) or lower retrieval.recall_floor",
    "MetricMismatchError": "indexes must use inner product, the model's score",
    "ExportError": "retrain or re-export from the same prepared artifact",
    "RetrievalClientError": "is the retrieval server running at that URL?",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML file (e.g. configs/synthetic-small.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.epochs=5 (repeatable)",
    )


def _cfg(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def _run_cfg(args: argparse.Namespace) -> Config:
    """The config a run was fitted with (RUN_DIR/config.json), unless --config is given; then --set."""
    from recsys.config import from_dict, merge, parse_override

    run_cfg = Path(getattr(args, "run", "") or "") / "config.json"
    if args.config or not run_cfg.exists():
        return _cfg(args)
    cfg = from_dict(json.loads(run_cfg.read_text()), str(run_cfg))
    for o in args.overrides:
        cfg = merge(cfg, parse_override(o), f"--set {o}")
    return cfg


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------------------------------------- commands


def cmd_generate(args: argparse.Namespace) -> int:
    from data_pipelines import synthetic

    summary = synthetic.generate(args.out, preset=args.preset, seed=args.seed, progress=lambda m: print(m, file=sys.stderr))
    _print(summary)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from recsys.pipeline import prepare_data, resolve_source

    cfg, source, data_dir = resolve_source(_cfg(args), args.data)
    assert data_dir is not None
    manifest = prepare_data(cfg, source, data_dir, Path(args.out), progress=lambda m: print(m, file=sys.stderr))
    _print({k: manifest.get(k) for k in ("row_counts", "rejected", "split", "n_users", "n_products", "n_sellers")})
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from towers import train

    cfg = _cfg(args)
    _print(train.run(cfg, args.prepared, args.out, resume=not args.no_resume))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from towers import evaluate

    cfg = _cfg(args)
    baselines = None if args.baselines is None else tuple(b for b in args.baselines.split(",") if b)
    report = evaluate.run(cfg, args.run, args.prepared, split=args.split, baselines=baselines)
    print(evaluate.markdown_table(report))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from recsys import pipeline

    cfg = _cfg(args)
    results = pipeline.fit(cfg, args.out, data=args.data, from_stage=args.from_stage, progress=args.progress)
    _print(results)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from recsys import quickstart

    return quickstart.run(args.out, config=args.config, overrides=args.overrides, serve=not args.no_serve)


def cmd_export(args: argparse.Namespace) -> int:
    from retrieval import export

    _print(export.run(_run_cfg(args), args.run, args.prepared))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from retrieval import faiss_index

    _print(faiss_index.run(_run_cfg(args), args.run))
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    if args.swap_url:
        from retrieval.client import swap_bundle

        if not args.bundle:
            raise ValueError("--swap-url needs --bundle DIR (the bundle to load)")
        _print(swap_bundle(args.swap_url, args.bundle))
        return 0
    from retrieval import bundle

    if not args.run:
        raise ValueError("recsys bundle needs --run RUN_DIR (or --swap-url URL --bundle DIR)")
    _print(bundle.run(_run_cfg(args), args.run))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from retrieval.service import serve

    serve(_run_cfg(args), run_dir=args.run, bundle=args.bundle, host=args.host, port=args.port)
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from retrieval import recommend

    _print(recommend.run(_run_cfg(args), args.run, args.users, args.k, args.out, what=args.what))
    return 0


def cmd_train_ranker(args: argparse.Namespace) -> int:
    from ranking import data
    from ranking import train as ranker_train

    cfg = _run_cfg(args)
    if args.rebuild_data or not (Path(args.run) / "ranker_data" / "manifest.json").exists():
        data.run(cfg, args.run)
    _print(ranker_train.run(cfg, args.run, progress=args.progress))
    return 0


def cmd_evaluate_ranker(args: argparse.Namespace) -> int:
    from ranking import evaluate as ranker_evaluate

    print(ranker_evaluate.markdown(ranker_evaluate.run(_run_cfg(args), args.run)))
    return 0


def cmd_serve_ranker(args: argparse.Namespace) -> int:
    from ranking import service

    service.serve(_run_cfg(args), args.run, args.retrieval_url, args.host, args.port)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from recsys import report

    print(report.run(args.run, args.compare, args.out))
    return 0


def cmd_ab_analyze(args: argparse.Namespace) -> int:
    from recsys.ab.analysis import analyze

    cfg = _cfg(args)
    rep = analyze(
        args.exposures,
        args.events,
        out_dir=args.out,
        window_days=args.window_days,
        experiment=args.experiment,
        control=args.control,
        ab=cfg.ab if cfg.ab.experiment else None,
        n_boot=args.bootstrap,
        alpha=args.alpha,
    )
    print((Path(rep["out_dir"]) / "report.md").read_text())
    return 0


def cmd_ab_plan(args: argparse.Namespace) -> int:
    from recsys.ab.analysis import plan_sample_size

    _print(plan_sample_size(args.baseline, args.lift, alpha=args.alpha, power=args.power))
    return 0


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recsys",
        description="Marketplace recommender: Spark data pipelines, two-tower retrieval (products and sellers), "
        "FAISS serving and a neural ranker.",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="write a synthetic marketplace in the raw data contract")
    g.add_argument("--out", required=True, help="output directory for the raw tables")
    g.add_argument("--preset", default="small", choices=["small", "medium", "large"], help="size preset")
    g.add_argument("--seed", type=int, default=7, help="random seed (same seed, same data)")
    g.set_defaults(fn=cmd_generate)

    pr = sub.add_parser("prepare", help="validate raw tables and write vocabularies, splits, features, examples")
    pr.add_argument("--data", required=True, help="directory with the raw tables (CSV or Parquet) or a known source layout")
    pr.add_argument("--out", required=True, help="prepared artifact directory to write")
    _add_config_args(pr)
    pr.set_defaults(fn=cmd_prepare)

    t = sub.add_parser("train", help="train the two-tower model on a prepared artifact")
    t.add_argument("--prepared", required=True, help="prepared artifact directory")
    t.add_argument("--out", required=True, help="run directory (checkpoints, MLflow store, model)")
    t.add_argument("--no-resume", action="store_true",
                   help="train from scratch (by default an unfinished training of the same config and data resumes)")
    _add_config_args(t)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("evaluate", help="full-ranking evaluation of the towers and baselines")
    e.add_argument("--run", required=True, help="run directory with a trained model")
    e.add_argument("--prepared", help="prepared artifact (default: the one the model was trained on)")
    e.add_argument("--split", default="test", choices=["val", "test"])
    e.add_argument("--baselines", help="comma-separated baselines to add (popularity,als); default from config")
    _add_config_args(e)
    e.set_defaults(fn=cmd_evaluate)

    ex = sub.add_parser("export", help="embeddings of all products, sellers and known users (Parquet + float32)")
    ex.add_argument("--run", required=True, help="run directory with a trained model")
    ex.add_argument("--prepared", help="prepared artifact (default: the one the model was trained on)")
    _add_config_args(ex)
    ex.set_defaults(fn=cmd_export)

    ix = sub.add_parser("index", help="FAISS product and seller indexes, recall checked against exact search")
    ix.add_argument("--run", required=True, help="run directory with an export")
    _add_config_args(ix)
    ix.set_defaults(fn=cmd_index)

    bu = sub.add_parser("bundle", help="build a versioned serving bundle (export + index + vocab + user tower), "
                        "or swap a running server to another bundle")
    bu.add_argument("--run", help="run directory to bundle (exports and indexes when missing or stale)")
    bu.add_argument("--swap-url", help="base URL of a running retrieval server to swap")
    bu.add_argument("--bundle", help="bundle directory to swap in (with --swap-url)")
    _add_config_args(bu)
    bu.set_defaults(fn=cmd_bundle)

    sv = sub.add_parser("serve", help="start the retrieval HTTP API (OpenAPI at /docs)")
    sv.add_argument("--run", help="run directory (serves its CURRENT bundle, built if missing)")
    sv.add_argument("--bundle", help="a bundle directory to serve instead")
    sv.add_argument("--host", help="bind address (default serve.host)")
    sv.add_argument("--port", type=int, help="port (default serve.port)")
    _add_config_args(sv)
    sv.set_defaults(fn=cmd_serve)

    rc = sub.add_parser("recommend", help="top-K products (or sellers) for a list of users, to Parquet")
    rc.add_argument("--run", required=True, help="run directory")
    rc.add_argument("--users", required=True, help="one user id per line, or a CSV/Parquet file with a user_id column")
    rc.add_argument("--k", type=int, default=100, help="list length")
    rc.add_argument("--out", required=True, help="output Parquet file")
    rc.add_argument("--what", default="products", choices=["products", "sellers"])
    _add_config_args(rc)
    rc.set_defaults(fn=cmd_recommend)

    tr = sub.add_parser("train-ranker", help="build ranker training lists (Spark) and train the neural ranker")
    tr.add_argument("--run", required=True, help="run directory with a trained two-tower model")
    tr.add_argument("--rebuild-data", action="store_true", help="rebuild RUN_DIR/ranker_data even if present")
    tr.add_argument("--progress", action="store_true", help="show training progress bars")
    _add_config_args(tr)
    tr.set_defaults(fn=cmd_train_ranker)

    er = sub.add_parser("evaluate-ranker", help="NDCG@10 / Recall@10 / MRR of ranker vs retrieval order, bootstrap CIs")
    er.add_argument("--run", required=True, help="run directory with a trained ranker")
    _add_config_args(er)
    er.set_defaults(fn=cmd_evaluate_ranker)

    sr = sub.add_parser("serve-ranker", help="the ranking API with the end-to-end /v1/recommend endpoint")
    sr.add_argument("--run", required=True, help="run directory with a trained ranker")
    sr.add_argument("--retrieval-url", required=True, help="base URL of the retrieval service")
    sr.add_argument("--host", help="bind address (default serve.host)")
    sr.add_argument("--port", type=int, help="port (default serve.ranking_port)")
    _add_config_args(sr)
    sr.set_defaults(fn=cmd_serve_ranker)

    f = sub.add_parser("fit", help="run every offline stage: prepare, train, evaluate, refit, export, index, ranker")
    f.add_argument("--data", help="raw data directory (raw contract, Olist, LightGCN or MovieLens layout); "
                   "overrides the config's data source")
    f.add_argument("--out", required=True, help="run directory (every stage's artifact goes under it)")
    f.add_argument("--from", dest="from_stage", help="rerun from this stage even if it is up to date")
    f.add_argument("--progress", action="store_true", help="show training progress bars")
    _add_config_args(f)
    f.set_defaults(fn=cmd_fit)

    q = sub.add_parser("quickstart", help="generate a small synthetic marketplace, fit everything, serve it, query it")
    q.add_argument("--out", default="runs/quickstart", help="run directory")
    q.add_argument("--no-serve", action="store_true", help="skip starting the API and sending requests")
    _add_config_args(q)
    q.set_defaults(fn=cmd_quickstart)

    r = sub.add_parser("report", help="HTML + Markdown report: side-by-side metrics, curves, slices, training, data")
    r.add_argument("--run", required=True, help="run directory")
    r.add_argument("--compare", action="append", default=[], metavar="RUN_DIR", help="another run to compare (repeatable)")
    r.add_argument("--out", help="output directory (default RUN_DIR/report)")
    r.set_defaults(fn=cmd_report)

    ab = sub.add_parser("ab", help="A/B testing: analyze exposure logs against later events, plan sample sizes")
    abs_ = ab.add_subparsers(dest="ab_command", metavar="ACTION")
    an = abs_.add_parser("analyze", help="per-variant conversion, revenue, CTR/PTR at position, CIs, p-values, SRM check")
    an.add_argument("--exposures", action="append", required=True, help="exposure log file or directory (repeatable)")
    an.add_argument("--events", required=True, help="events table (raw contract; CSV/Parquet file or folder)")
    an.add_argument("--out", default="ab_report", help="output directory for report.json / report.md")
    an.add_argument("--window-days", type=float, default=7.0, help="attribution window after an exposure")
    an.add_argument("--experiment", help="experiment name (default: the only one in the log)")
    an.add_argument("--control", help="control variant name (default: config or the first variant)")
    an.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples for confidence intervals")
    an.add_argument("--alpha", type=float, default=0.05, help="significance level")
    _add_config_args(an)
    an.set_defaults(fn=cmd_ab_analyze)
    pl_ = abs_.add_parser("plan", help="users per variant needed to detect a relative lift")
    pl_.add_argument("--baseline", type=float, required=True, help="baseline conversion rate, e.g. 0.05")
    pl_.add_argument("--lift", type=float, required=True, help="relative lift to detect, e.g. 0.1 for +10%%")
    pl_.add_argument("--alpha", type=float, default=0.05)
    pl_.add_argument("--power", type=float, default=0.8)
    pl_.set_defaults(fn=cmd_ab_plan)
    ab.set_defaults(fn=lambda a: (ab.print_help(), 2)[1])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    # MLflow 3.2+ sends usage data to its servers by default; a local tool stays off the network
    # unless told otherwise (set MLFLOW_DISABLE_TELEMETRY=false to allow it)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if not args.verbose:
        for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "mlflow", "alembic", "py4j"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # Lightning and MLflow raise their loggers back to INFO when they are imported (later, by the
        # stage that needs them): the handler drops what is below WARNING, and MLflow reads its level here
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        import warnings

        warnings.filterwarnings("ignore")
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI turns every failure into one line
        if args.verbose:
            traceback.print_exc()
        name = type(e).__name__
        msg = str(e).strip().splitlines()[0] if str(e).strip() else name
        print(f"error: {msg}", file=sys.stderr)
        hint = HINTS.get(name)
        if hint:
            print(f"hint: {hint}; rerun with --verbose for the traceback", file=sys.stderr)
        else:
            print("hint: rerun with --verbose for the traceback", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
