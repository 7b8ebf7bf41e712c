"""TowerAdam takes the steps of RowSparseAdam on the tables and of fused AdamW on the dense layers."""

from __future__ import annotations

import copy

import pytest
import torch

from towers.row_sparse_adam import RowSparseAdam
from towers.tower_adam import TowerAdam


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(50, 6, sparse=True)
        self.lin = torch.nn.Linear(6, 3)

    def loss(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step)
        # two lookups of the table: an uncoalesced sparse gradient with repeated ids
        x = self.table(torch.randint(0, 50, (20,), generator=g)) + self.table(torch.randint(0, 8, (20,), generator=g))
        return self.lin(x).tanh().pow(2).sum() * (1 + step % 3)


def _pair(seed: int = 0) -> tuple[Net, Net]:
    torch.manual_seed(seed)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    return a, b


def _steps(net: Net, opts, steps) -> None:
    for step in steps:
        for o in opts:
            o.zero_grad()
        net.loss(step).backward()
        for o in opts:
            o.step()


def _tower_adam(net: Net) -> TowerAdam:
    return TowerAdam([net.table.weight], net.lin.parameters(), lr_sparse=0.05, lr_dense=0.01, weight_decay=0.1,
                     betas=(0.8, 0.95), eps=1e-6)


def test_matches_row_sparse_adam_plus_fused_adamw() -> None:
    a, b = _pair()
    ref = [RowSparseAdam([a.table.weight], lr=0.05, betas=(0.8, 0.95), eps=1e-6),
           torch.optim.AdamW(a.lin.parameters(), lr=0.01, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6, fused=True)]
    ours = _tower_adam(b)
    for step in range(25):
        _steps(a, ref, [step])
        _steps(b, [ours], [step])
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pb, pa, rtol=0, atol=0)
    assert ours.state[b.table.weight]["step"] == 25 and float(ours.state[b.lin.weight]["step"]) == 25
    assert [g["rows"] for g in ours.param_groups] == [True, False]


def test_state_dict_round_trip_resumes_identically() -> None:
    a, b = _pair(1)
    oa = _tower_adam(a)
    _steps(a, [oa], range(4))
    b.load_state_dict(a.state_dict())
    ob = _tower_adam(b)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # a checkpoint holds copies
    _steps(a, [oa], range(4, 9))
    _steps(b, [ob], range(4, 9))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0)


def test_states_exist_before_the_first_step_and_one_group_may_be_empty() -> None:
    a, _ = _pair(2)
    opt = TowerAdam([a.table.weight], [], lr_sparse=0.1, lr_dense=0.1)
    assert len(opt.param_groups) == 1 and opt.state[a.table.weight]["exp_avg"].shape == a.table.weight.shape
    dense_only = TowerAdam([], a.lin.parameters(), lr_sparse=0.1, lr_dense=0.1)
    assert not dense_only.state[a.lin.weight]["exp_avg_sq"].any()
    before = a.lin.weight.detach().clone()
    _steps(a, [dense_only], [0])
    assert not torch.equal(a.lin.weight, before)


def test_invalid_settings_name_the_value() -> None:
    a, _ = _pair()
    with pytest.raises(ValueError, match="weight_decay=-1"):
        TowerAdam([a.table.weight], a.lin.parameters(), lr_sparse=0.1, lr_dense=0.1, weight_decay=-1)
