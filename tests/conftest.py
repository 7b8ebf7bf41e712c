"""Shared fixtures: one SparkSession per test session, tiny local[2]."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def spark():
    from data_pipelines.spark_session import get_spark
    from recsys.config import SparkConfig

    s = get_spark(SparkConfig(master="local[2]", driver_memory="2g", shuffle_partitions=2, app_name="recsys-tests"))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    root = Path(os.environ.get("RECSYS_SHARED_DATASETS", SHARED_DATASETS))
    if not root.exists():
        pytest.skip(f"shared datasets not found at {root}")
    return root
