"""BitDropout / keep_mask: the drop rate, scaling, gradient, eval identity and reproducibility."""

import pytest
import torch

from towers.bit_dropout import BitDropout, keep_mask


@pytest.mark.parametrize("p", [0.05, 0.1, 0.2, 0.5, 0.9])
def test_keep_mask_drops_at_rate_p(p):
    g = torch.Generator().manual_seed(3)
    keep = keep_mask((997, 301), p, generator=g)  # not a multiple of 4 entries
    assert keep.shape == (997, 301) and keep.dtype == torch.bool
    n = keep.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs((1 - keep.float().mean().item()) - p) < 5 * sd + 1 / 32768


def test_keep_mask_slices_are_independent():
    # the four 15-bit slices of one word must not be correlated: compare neighbours within a word
    keep = keep_mask((400_000,), 0.5, generator=torch.Generator().manual_seed(0)).float().reshape(-1, 4)
    for a in range(4):
        for b in range(a + 1, 4):
            c = torch.corrcoef(torch.stack([keep[:, a], keep[:, b]]))[0, 1].item()
            assert abs(c) < 0.01, (a, b, c)


def test_keep_mask_edges_and_reproducibility():
    assert keep_mask((0, 5), 0.3).shape == (0, 5)
    assert keep_mask((7,), 0.0).all()
    assert not keep_mask((7,), 1.0).any()
    a = keep_mask((33, 3), 0.4, generator=torch.Generator().manual_seed(11))
    b = keep_mask((33, 3), 0.4, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    torch.manual_seed(5)
    c = keep_mask((33, 3), 0.4)
    torch.manual_seed(5)
    assert torch.equal(c, keep_mask((33, 3), 0.4))


def test_bit_dropout_scales_kept_entries_and_their_gradient():
    torch.manual_seed(0)
    d = BitDropout(0.25)
    x = torch.randn(64, 33, requires_grad=True)
    y = d(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(kept, g / 0.75, torch.zeros_like(g)))
    # the expectation is kept: mean of many draws of a constant input
    ones = torch.ones(200_000)
    assert abs(d(ones).mean().item() - 1.0) < 0.01


def test_bit_dropout_eval_zero_and_one():
    x = torch.randn(8, 4)
    d = BitDropout(0.5).eval()
    assert d(x) is x
    assert BitDropout(0.0)(x) is x
    assert torch.equal(BitDropout(1.0)(x), torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability"):
        BitDropout(1.5)
