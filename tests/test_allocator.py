"""towers.allocator: a training-like step stops page-faulting its temporaries back in; large tables
get huge pages."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap

import pytest
import torch

from towers.allocator import advise_huge_pages, retain_freed_memory

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

    # warm up past the early high-water marks of the heap (they fault once whatever the settings)
    for _ in range(15):
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
    # The default's count depends on glibc's adaptive mmap threshold: 18k-47k over 30 steps on the
    # machines seen, against 1.8k-4.1k retained, so the margin asked for is 2x, not the usual 5-25x.
    assert statistics.median(retained["faults"]) <= 10, retained
    assert sum(default["faults"]) > 2 * max(sum(retained["faults"]), 100), (default, retained)


def test_returns_a_bool() -> None:
    assert retain_freed_memory() in (True, False)


def _mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding ``address``."""
    fields: dict[str, str] = {}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    return fields


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "none"
    return text.split("[")[1].split("]")[0]


@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() not in ("always", "madvise"),
                    reason="Linux transparent huge pages")
def test_large_tensors_are_marked_for_huge_pages_and_keep_their_data() -> None:
    big = torch.randn(40 * 1024 * 1024 // 4)  # 40 MiB, already written
    small = torch.randn(1024)
    before = big.clone()
    assert advise_huge_pages([big, small, torch.empty(0), big[1:]]) == 1
    assert torch.equal(big, before)
    huge = 2 * 1024 * 1024
    inner = -(-big.data_ptr() // huge) * huge  # the first 2 MiB boundary inside the tensor
    fields = _mapping_of(inner)
    assert "hg" in fields["VmFlags"].split(), fields  # madvise(MADV_HUGEPAGE) took
    release = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit())
    if release >= (6, 1):  # MADV_COLLAPSE moved the written pages at once (if huge pages were free)
        collapsed = int(fields["AnonHugePages"].split()[0])
        if collapsed == 0:
            pytest.skip("the kernel had no free huge pages to collapse into")
        assert collapsed >= 2048


@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() not in ("always", "madvise"),
                    reason="Linux transparent huge pages")
def test_training_module_marks_its_large_tables_and_moments() -> None:
    from recsys.config import Config, to_dict
    from towers.lit_module import TwoTowerLightning
    from towers.shapes import TowerShape

    # a 25.6 MB product table and its Adam moments (one table of both) are marked; the small user and seller tables are not
    shape = TowerShape(n_users=100, n_products=100_000, n_sellers=5, n_categories=1, n_brands=1,
                       n_product_features=0, n_seller_features=0, dim=64)
    lit = TwoTowerLightning(shape.to_dict(), to_dict(Config().train), {})
    assert lit.use_huge_pages([lit.configure_optimizers()]) == 2
