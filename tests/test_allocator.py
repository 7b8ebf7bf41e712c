"""retain_freed_memory: a training-like step stops page-faulting its temporaries back in."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap

import pytest

from towers.allocator import retain_freed_memory

_STEP = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from towers.allocator import retain_freed_memory
    applied = retain_freed_memory() if sys.argv[1] == "retain" else None
    torch.manual_seed(0)
    torch.set_num_threads(1)
    table = torch.nn.Embedding(50_000, 64, sparse=True)
    opt = torch.optim.SparseAdam(table.parameters(), lr=0.01)

    def step():
        ids = torch.randint(0, 50_000, (1024, 20))
        u = torch.nn.functional.embedding_bag(ids, table.weight, mode="mean", sparse=True)
        v = table(torch.randint(0, 50_000, (1024,)))
        loss = torch.nn.functional.cross_entropy(u @ v.T / 0.1, torch.arange(1024))
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    faults = []
    for _ in range(30):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "faults": faults}))
    """
)


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _STEP, mode], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_training_step_stops_page_faulting_its_temporaries() -> None:
    retained = _faults("retain")
    if not retained["applied"]:
        pytest.skip("the C library is not glibc")
    default = _faults("default")
    # A 1024 x 1024 logit matrix alone is 1,024 pages and a step allocates several such temporaries.
    # Retained, only a step that needs more heap than any before it faults (a new high-water mark).
    assert statistics.median(retained["faults"]) <= 10, retained
    assert sum(default["faults"]) > 5 * max(sum(retained["faults"]), 100), (default, retained)


def test_returns_a_bool() -> None:
    assert retain_freed_memory() in (True, False)
