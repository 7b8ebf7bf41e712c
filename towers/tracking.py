"""MLflow tracking: a local sqlite store under the run directory unless a server is configured."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any


def tracking_uri(configured: str, run_dir: str | Path) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///RUN_DIR/mlflow.db``."""
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def ensure_experiment(uri: str, name: str, run_dir: str | Path) -> str:
    """Experiment id, creating the experiment with its artifacts under the run dir if needed."""
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    loc = None
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        loc = (Path(run_dir).resolve() / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=loc)


def register(client, name: str, source: str, run_id: str, metric: str, value: float) -> str:
    """Register a model version and move the ``champion`` alias to it when it is at least as good.

    Returns:
        The new version number.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:
        pass
    mv = client.create_model_version(name, source=source, run_id=run_id, tags={metric: str(value)})
    try:
        champ = client.get_model_version_by_alias(name, "champion")
        best = float(champ.tags.get(metric, "-inf"))
    except MlflowException:
        best = float("-inf")
    if value >= best:
        client.set_registered_model_alias(name, "champion", mv.version)
    client.set_registered_model_alias(name, "candidate", mv.version)
    return str(mv.version)
