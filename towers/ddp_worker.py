"""One data-parallel training rank (> 0), started by :func:`towers.ddp.worker_processes`.

    python -m towers.ddp_worker SPEC.json

SPEC holds the resolved config and the arguments of rank 0's :func:`towers.train.run` call; this
process runs the same call, which joins rank 0's fit and returns after it (only rank 0 writes the
model, the logs and the MLflow run).
"""

from __future__ import annotations

import json
import sys

from recsys.config import from_dict
from towers import train
from towers.ddp import exit_with_parent


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m towers.ddp_worker SPEC.json\n")
        return 2
    exit_with_parent()
    spec = json.loads(open(args[0]).read())
    train.run(from_dict(spec["config"], source=args[0]), **spec["run"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
