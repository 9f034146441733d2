"""GAE: hand-computed case, and the vectorized torch scan and the Triton kernel against the token loop."""

import pytest
import torch

from rlhf_kernels import gae
from rlhf_kernels.reference import gae_reference


def test_hand_computed_two_steps():
    r = torch.tensor([[0.0, 1.0]])
    v = torch.tensor([[0.5, 0.25]])
    m = torch.ones(1, 2, dtype=torch.bool)
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8, backend="torch")
    a1 = 1.0 + 0.0 - 0.25  # terminal: V_next = 0
    a0 = (0.0 + 0.9 * 0.25 - 0.5) + 0.9 * 0.8 * a1
    assert adv.tolist()[0] == pytest.approx([a0, a1])
    assert ret.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.25])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_matches_reference_with_padding_and_holes(backend, gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 19, 13
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    m = torch.ones(B, T, dtype=torch.bool)
    m[:5, 9:] = False  # right padding
    m[5:10, :4] = False  # left padding
    m[10:14, 6] = False  # a hole inside the response
    m[14] = False  # an empty row
    want = gae_reference(r, v, m, gamma, lam)
    got = gae(r, v, m, gamma, lam, backend=backend)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.all(got[0][~m] == 0) and torch.all(got[1][~m] == 0)
