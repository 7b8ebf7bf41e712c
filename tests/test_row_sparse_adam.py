"""RowSparseAdam takes the same steps as torch.optim.SparseAdam, with fewer passes over the tables."""

from __future__ import annotations

import copy

import pytest
import torch

from towers.row_sparse_adam import RowSparseAdam


def _tables(seed: int = 0) -> tuple[torch.nn.Embedding, torch.nn.Embedding]:
    torch.manual_seed(seed)
    a = torch.nn.Embedding(40, 6, sparse=True)
    b = torch.nn.Embedding(40, 6, sparse=True)
    b.weight.data.copy_(a.weight.data)
    return a, b


def _loss(table: torch.nn.Embedding, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    # two lookups of one table (an uncoalesced gradient with repeated ids), different rows each step
    x = table(torch.randint(0, 40, (25,), generator=g))
    y = table(torch.randint(0, 10, (7,), generator=g))
    return (x.sin().sum() + (y**2).sum()) * (1 + step % 3)


def _train(pairs, steps) -> None:
    """Step each (table, optimizer) pair through ``steps`` of :func:`_loss`, in lockstep."""
    for step in steps:
        for table, opt in pairs:
            opt.zero_grad()
            _loss(table, step).backward()
            opt.step()


def test_matches_torch_sparse_adam_over_many_steps() -> None:
    a, b = _tables()
    ref = torch.optim.SparseAdam(a.parameters(), lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    ours = RowSparseAdam(b.parameters(), lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    for step in range(30):
        _train([(a, ref), (b, ours)], [step])
        torch.testing.assert_close(b.weight, a.weight, rtol=1e-5, atol=1e-6)
    sa, so = ref.state[a.weight], ours.state[b.weight]
    assert so["step"] == sa["step"] == 30
    torch.testing.assert_close(so["exp_avg"], sa["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(so["exp_avg_sq"], sa["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_untouched_rows_keep_weights_and_moments() -> None:
    _, t = _tables()
    opt = RowSparseAdam(t.parameters(), lr=0.1)
    before = t.weight.detach().clone()
    t(torch.tensor([3, 3, 5])).sum().backward()
    opt.step()
    changed = (t.weight != before).any(1).nonzero().flatten().tolist()
    assert changed == [3, 5]
    assert opt.state[t.weight]["exp_avg"][[0, 1, 2, 4, 6]].abs().sum() == 0


def test_dense_gradient_updates_every_row_like_sparse_adam_would() -> None:
    a, b = _tables(1)
    dense = torch.nn.Parameter(b.weight.detach().clone())
    opt_s = RowSparseAdam(a.parameters(), lr=0.01)
    opt_d = RowSparseAdam([dense], lr=0.01)
    ids = torch.arange(40)
    a(ids).pow(2).sum().backward()
    dense[ids].pow(2).sum().backward()
    opt_s.step()
    opt_d.step()
    torch.testing.assert_close(dense, a.weight)


def test_state_dict_round_trip_resumes_identically() -> None:
    a, b = _tables(2)
    oa = RowSparseAdam(a.parameters(), lr=0.05)
    _train([(a, oa)], range(3))
    b.weight.data.copy_(a.weight.data)
    ob = RowSparseAdam(b.parameters(), lr=0.05)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # a checkpoint holds copies
    _train([(a, oa), (b, ob)], range(3, 6))
    torch.testing.assert_close(b.weight, a.weight)


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="betas"):
        RowSparseAdam([torch.nn.Parameter(torch.zeros(2))], betas=(1.0, 0.9))


def test_resumes_from_a_sparse_adam_state() -> None:
    # checkpoints written before RowSparseAdam hold torch.optim.SparseAdam's state
    a, b = _tables(3)
    ref = torch.optim.SparseAdam(a.parameters(), lr=0.05)
    _train([(a, ref)], range(3))
    b.weight.data.copy_(a.weight.data)
    ours = RowSparseAdam(b.parameters(), lr=0.05)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    _train([(a, ref), (b, ours)], range(3, 6))
    torch.testing.assert_close(b.weight, a.weight, rtol=1e-5, atol=1e-6)


def test_moments_exist_before_the_first_step_and_missing_states_start_fresh() -> None:
    a, b = _tables(4)
    ours = RowSparseAdam([a.weight, b.weight], lr=0.05)
    for p in (a.weight, b.weight):  # allocated up front, so they can be placed before training
        st = ours.state[p]
        assert st["step"] == 0 and st["exp_avg"].shape == p.shape and not st["exp_avg_sq"].any()
    # a SparseAdam checkpoint has no state for a table it never stepped
    ref = torch.optim.SparseAdam([a.weight, b.weight], lr=0.05)
    _train([(a, ref)], range(2))
    assert len(ref.state_dict()["state"]) == 1
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    _train([(b, ours)], [5])
    assert ours.state[b.weight]["step"] == 1 and ours.state[a.weight]["step"] == 2


def test_rows_with_zero_gradients_match_sparse_adam() -> None:
    # rows looked up by examples of weight 0 get exact-zero gradients (v = 0: a special case of the root)
    a, b = _tables(5)
    ref = torch.optim.SparseAdam(a.parameters(), lr=0.05)
    ours = RowSparseAdam(b.parameters(), lr=0.05)
    start = b.weight.detach().clone()
    for step in range(6):
        for table, opt in ((a, ref), (b, ours)):
            opt.zero_grad()
            zero_rows = torch.tensor([7, 8, 9]) if step % 2 else torch.tensor([7, 8, 1])
            (table(torch.tensor([1, 2, 3])).sin().sum() + 0.0 * table(zero_rows).sum()).backward()
            opt.step()
        torch.testing.assert_close(b.weight, a.weight, rtol=1e-5, atol=1e-6)
    assert torch.all(ours.state[b.weight]["exp_avg_sq"][[7, 8, 9]] == 0)
    assert torch.equal(b.weight[[7, 8, 9]], start[[7, 8, 9]])  # touched, but a zero step
