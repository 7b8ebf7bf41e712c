"""Benchmark `prepare`: generate a synthetic marketplace, run the Spark job, report rows/s per core,
wall time, the per-stage timings, and peak memory: the Python driver's, and the whole process tree's
(driver + Spark JVM + Python workers, summed RSS sampled every 0.2 s).

    python benchmarks/bench_prepare.py --preset medium      # ~1M events
    python benchmarks/bench_prepare.py --preset large       # ~10M events (goal: < 2 min, < 8 GB on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import psutil  # installed with petastorm

from data_pipelines import prepare, synthetic
from recsys.config import load_config


class TreeMemory:
    """Samples the summed RSS of this process and all its descendants: ``peak`` (and ``peak_jvm``, the Java
    processes only) is the maximum seen, in bytes."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.every_s = every_s
        self.peak = 0
        self.peak_jvm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = jvm = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                    total += rss
                    if "java" in p.name():
                        jvm += rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.peak_jvm = max(self.peak_jvm, jvm)
            self._stop.wait(self.every_s)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


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
    with TreeMemory() as mem:
        m = prepare.run(cfg, str(raw), str(root / "prepared"))
    wall = time.time() - t1
    events = int(summary["events"])
    cores = os.cpu_count() or 1
    # The Spark JVM is still running here, so its peak is not in RUSAGE_CHILDREN: TreeMemory samples it.
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "preset": a.preset, "events": events, "generate_s": round(gen_s, 1), "prepare_wall_s": round(wall, 1),
        "rows_per_s_per_core": round(events / wall / cores), "cores": cores, "peak_rss_mb_python_driver": round(peak_mb),
        "peak_rss_mb_process_tree": round(mem.peak / 2**20), "peak_rss_mb_spark_jvm": round(mem.peak_jvm / 2**20),
        "timings_s": {k: round(v, 1) for k, v in m["timings_s"].items()},
        "rejected": m.get("rejected"), "workdir": str(root),
    }, indent=2))


if __name__ == "__main__":
    main()
