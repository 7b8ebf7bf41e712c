"""``recsys quickstart``: the whole system on the built-in synthetic marketplace, in one command."""

from __future__ import annotations

import json
from pathlib import Path

from recsys import pipeline
from recsys.config import load_config

SYNTHETIC_SMALL = Path(__file__).resolve().parents[1] / "configs" / "synthetic-small.yaml"


def _table(report: dict) -> str:
    lines = ["", "Held-out purchases, full-catalog ranking (test split):", ""]
    header = f"{'model':<14} {'what':<9} {'Recall@10':>10} {'Recall@20':>10} {'NDCG@20':>9} {'MRR':>7}"
    lines += [header, "-" * len(header)]
    for model, r in report["models"].items():
        for what in ("products", "sellers"):
            if what in r:
                m = r[what]
                lines.append(
                    f"{model:<14} {what:<9} {m.get('recall@10', 0):>10.4f} {m.get('recall@20', 0):>10.4f} "
                    f"{m.get('ndcg@20', m.get('ndcg@10', 0)):>9.4f} {m.get('mrr', 0):>7.4f}"
                )
    return "\n".join(lines)


def run(out: str | Path, config: str | None = None, overrides: list[str] | tuple[str, ...] = (), serve: bool = True) -> int:
    """Fit on the synthetic marketplace, print metrics and artifact locations (and query the API).

    Returns:
        Process exit code.
    """
    out = Path(out)
    path = config or (SYNTHETIC_SMALL if SYNTHETIC_SMALL.exists() else None)
    over = list(overrides) if path else ["data.source=synthetic", *overrides]
    cfg = load_config(path, over)
    pipeline.fit(cfg, out)
    report = json.loads((out / "eval" / "report.json").read_text())
    print(_table(report))
    print("\nArtifacts:")
    for name in ("raw", "prepared", "model", "eval", "model_full", "export", "index", "bundles", "ranker", "mlflow.db"):
        p = out / name
        if p.exists():
            print(f"  {name:<11} {p}")
    print(f"\nMLflow UI:  mlflow ui --backend-store-uri sqlite:///{(out / 'mlflow.db').resolve()}")
    return 0
