"""PooledRows / ragged_mean: values and gradients equal plain autograd over a [B, L, d] gather."""

from __future__ import annotations

import pytest
import torch

from towers.embeddings import embedding, ragged_mean, sorted_groups


def _reference(weight: torch.Tensor, idx, mask, weights=None) -> torch.Tensor:
    w = mask.float() if weights is None else weights * mask
    return (weight[idx] * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-12 if weights is not None else 1)


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_values_and_gradients_match_autograd_reference(sparse: bool, weighted: bool) -> None:
    g = torch.Generator().manual_seed(0)
    table = embedding(50, 8, sparse=sparse)
    # repeated ids within and across rows, an empty row, padding zeros
    idx = torch.randint(1, 12, (6, 7), generator=g)
    idx[2] = 0
    mask = (idx > 0) & (torch.rand(6, 7, generator=g) > 0.3)
    mask[2] = False
    raw = torch.rand(6, 7, generator=g) + 0.1
    wr = raw.clone().requires_grad_(True) if weighted else None
    w2 = raw.clone().requires_grad_(True) if weighted else None
    up = torch.randn(6, 8, generator=g)

    out = ragged_mean(table, idx, mask, weights=wr)
    (out * up).sum().backward()
    ref_weight = table.weight.detach().clone().requires_grad_(True)
    ref = _reference(ref_weight, idx, mask, w2)
    (ref * up).sum().backward()

    torch.testing.assert_close(out, ref)
    assert torch.all(out[2] == 0)
    grad = table.weight.grad
    assert grad.is_sparse == sparse
    dense = grad.to_dense() if sparse else grad
    torch.testing.assert_close(dense, ref_weight.grad)
    if sparse:  # one row per distinct pooled id, nothing else
        assert set(grad.coalesce().indices()[0].tolist()) == set(idx[mask].tolist())
    if weighted:
        torch.testing.assert_close(wr.grad, w2.grad)


def test_no_grad_and_all_masked() -> None:
    table = embedding(10, 4, sparse=True)
    idx = torch.tensor([[1, 2], [3, 0]])
    with torch.no_grad():
        out = ragged_mean(table, idx, idx > 0)
    torch.testing.assert_close(out, _reference(table.weight.detach(), idx, idx > 0))
    empty = ragged_mean(table, idx, torch.zeros_like(idx, dtype=torch.bool))
    assert empty.shape == (2, 4) and torch.all(empty == 0)
    empty.sum().backward()  # nothing pooled: an empty gradient
    assert table.weight.grad._nnz() == 0
    for shape in [(0, 3), (2, 0)]:  # no rows, no history columns
        none = ragged_mean(table, torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.bool))
        assert none.shape == (shape[0], 4) and torch.all(none == 0)


@pytest.mark.parametrize("weighted", [False, True])
def test_masked_entries_are_never_looked_up(weighted: bool) -> None:
    table = embedding(10, 4, sparse=True)
    idx = torch.tensor([[1, -1, 7], [123, 2, 2]])  # -1 and 123 are no rows of the table
    mask = torch.tensor([[True, False, True], [False, True, True]])
    w = torch.rand(2, 3).requires_grad_(True) if weighted else None
    out = ragged_mean(table, idx, mask, weights=w)
    safe = idx.clamp(0, 9)
    torch.testing.assert_close(out, _reference(table.weight.detach(), safe, mask, None if w is None else w.detach()))
    out.sum().backward()
    assert table.weight.grad.coalesce().indices()[0].tolist() == [1, 2, 7]
    if weighted:
        assert torch.all(w.grad[~mask] == 0)


@pytest.mark.parametrize("sparse", [True, False])
def test_several_weightings_share_one_lookup(sparse: bool) -> None:
    g = torch.Generator().manual_seed(1)
    table = embedding(30, 5, sparse=sparse)
    idx = torch.randint(1, 9, (4, 6), generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.25
    raw = torch.rand(2, 4, 6, generator=g) + 0.1
    w, w_ref = raw.clone().requires_grad_(True), raw.clone().requires_grad_(True)
    up = torch.randn(2, 4, 5, generator=g)
    out = ragged_mean(table, idx, mask, weights=w)
    assert out.shape == (2, 4, 5)
    (out * up).sum().backward()
    ref_weight = table.weight.detach().clone().requires_grad_(True)
    ref = torch.stack([_reference(ref_weight, idx, mask, w_ref[k]) for k in range(2)])
    (ref * up).sum().backward()
    torch.testing.assert_close(out, ref)
    grad = table.weight.grad
    torch.testing.assert_close(grad.to_dense() if sparse else grad, ref_weight.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)


# in_numpy=False: the path GPUs take (torch.sort), run here on the CPU
@pytest.mark.parametrize("in_numpy", [True, False])
@pytest.mark.parametrize("offset", [0, 2**20 - 10, 2**62])  # one, two and four radix passes
@pytest.mark.parametrize("with_valid", [False, True])
def test_sorted_groups_is_a_stable_grouping(offset: int, with_valid: bool, in_numpy: bool) -> None:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 20, (300,), generator=g) + offset
    valid = torch.rand(300, generator=g) > 0.3 if with_valid else None
    uniq, order, counts, starts = sorted_groups(ids, valid, in_numpy)
    pos = torch.arange(300) if valid is None else valid.nonzero().squeeze(1)
    expected = sorted(pos.tolist(), key=lambda i: (ids[i].item(), i))  # by id, then position
    assert order.tolist() == expected
    assert uniq.tolist() == sorted(set(ids[pos].tolist()))
    assert counts.tolist() == [int((ids[pos] == u).sum()) for u in uniq]
    assert starts.tolist() == (torch.cumsum(counts, 0) - counts).tolist()
    assert torch.equal(ids[order[starts]], uniq)


@pytest.mark.parametrize("in_numpy", [True, False])
@pytest.mark.parametrize("big_ids", [False, True])
def test_sorted_groups_small_known_answer(big_ids: bool, in_numpy: bool) -> None:
    ids = torch.tensor([5, 2, 5, 2, 9, 5]) + (2**61 if big_ids else 0)
    valid = torch.tensor([True, True, True, False, True, True])
    uniq, order, counts, starts = sorted_groups(ids, valid, in_numpy)
    assert (uniq - (2**61 if big_ids else 0)).tolist() == [2, 5, 9]
    # positions by id, ties in entry order; the invalid entry 3 is left out
    assert order.tolist() == [1, 0, 2, 5, 4] and counts.tolist() == [1, 3, 1] and starts.tolist() == [0, 1, 4]
