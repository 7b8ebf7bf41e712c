"""Benchmark `prepare`: generate a synthetic marketplace, run the Spark job, report rows/s per core,
wall time and the Python driver's peak memory (measure the JVM with /usr/bin/time -v).

    python benchmarks/bench_prepare.py --preset medium      # ~1M events
    python benchmarks/bench_prepare.py --preset large       # ~10M events (goal: < 2 min, < 8 GB on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from data_pipelines import prepare, synthetic
from recsys.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=sorted(synthetic.PRESETS))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workdir", help="keep data here (default: a temporary directory)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. data.spark.driver_memory=8g")
    a = ap.parse_args()
    cfg = load_config(None, a.overrides)
    root = Path(a.workdir or tempfile.mkdtemp(prefix="bench_prepare_"))
    raw = root / "raw"
    t0 = time.time()
    summary = synthetic.generate(raw, preset=a.preset, seed=a.seed)
    gen_s = time.time() - t0
    t1 = time.time()
    m = prepare.run(cfg, str(raw), str(root / "prepared"))
    wall = time.time() - t1
    events = int(summary["events"])
    cores = os.cpu_count() or 1
    # The Spark JVM is still running here, so its peak is not in RUSAGE_CHILDREN: only the driver is reported.
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "preset": a.preset, "events": events, "generate_s": round(gen_s, 1), "prepare_wall_s": round(wall, 1),
        "rows_per_s_per_core": round(events / wall / cores), "cores": cores, "peak_rss_mb_python_driver": round(peak_mb),
        "rejected": m.get("rejected"), "workdir": str(root),
    }, indent=2))


if __name__ == "__main__":
    main()
