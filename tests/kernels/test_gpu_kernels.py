"""Compiled Triton kernels on a CUDA GPU, at the launch table's own configurations (skipped without one).

What the interpreter cannot show: bf16 tensor-core GEMMs, the real tile sizes, vocabulary splits picked by
the wave rule, H not a multiple of the K step, and vocabularies that are no multiple of the tile. The
oracles are the fp32 materialized references; the bf16 targets are those of docs/kernels.md.
"""

import pytest
import torch

from rlhf_kernels import gae, linear_logprob, ppo_policy_loss
from rlhf_kernels.reference import gae_reference, linear_logprob_reference

pytestmark = pytest.mark.gpu


def _inputs(n, h, v, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = dict(device="cuda", generator=g)
    xp = torch.randn(n, h, **make).to(dtype)
    wp = (torch.randn(v, h, **make) * h**-0.5).to(dtype)
    xq = torch.randn(n, h, **make).to(dtype)
    wq = (torch.randn(v, h, **make) * h**-0.5).to(dtype)
    y = torch.randint(0, v, (n,), **make)
    y[::7] = -100
    return xp, wp, xq, wq, y


# (N, H, V): H a multiple of every K step; H=1000 (masked K steps); a tp=8 shard of Llama 3's vocabulary
SHAPES = [(1024, 1024, 32003), (777, 1000, 5001), (2048, 4096, 16032)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_triton_table_configs_match_the_fp32_oracle(shape, dtype):
    xp, wp, xq, wq, y = _inputs(*shape, dtype)
    g = torch.Generator(device="cuda").manual_seed(1)
    up = [torch.randn(shape[0], device="cuda", generator=g) for _ in range(3)]
    x32 = xp.float().requires_grad_()
    w32 = wp.float().requires_grad_()
    want = linear_logprob_reference(x32, w32, y, ref_hidden=xq.float(), ref_weight=wq.float(), temperature=0.9)
    (want.logp * up[0] + want.entropy * up[1] + want.kl * up[2]).sum().backward()
    # (detached: in fp32 .float() returns xp itself, which the oracle's leaf x32 then is)
    xg, wg = xp.detach().clone().requires_grad_(), wp.detach().clone().requires_grad_()
    got = linear_logprob(xg, wg, y, ref_hidden=xq, ref_weight=wq, temperature=0.9, backend="triton")
    (got.logp * up[0] + got.entropy * up[1] + got.kl * up[2]).sum().backward()
    d = (got.logp - want.logp).abs()
    if dtype == torch.float32:
        assert d.max() <= 1e-4 and (got.kl - want.kl).abs().max() <= 1e-5
    else:
        assert d.mean() <= 1e-4 and d.max() <= 2e-3
        assert (got.kl - want.kl).abs().max() <= 1e-4
    assert ((got.entropy - want.entropy).abs() / want.entropy.abs().clamp(min=1e-3)).max() <= 1e-3
    assert got.logp.max() <= 0
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (xg.grad.float() - x32.grad).abs().max() <= tol * x32.grad.abs().max()
    assert (wg.grad.float() - w32.grad).abs().max() <= tol * w32.grad.abs().max()


def test_vocabulary_splits_equal_one_sweep_and_runs_are_bitwise_equal():
    from rlhf_kernels.triton_lm_head import TritonImpl

    xp, wp, xq, wq, y = _inputs(256, 1024, 50000, torch.bfloat16, seed=2)  # 2 token blocks: the rule splits
    auto = [linear_logprob(xp, wp, y, ref_hidden=xq, ref_weight=wq, backend="triton") for _ in range(2)]
    one = linear_logprob(xp, wp, y, ref_hidden=xq, ref_weight=wq, backend=TritonImpl(num_splits=1))
    for a, b in zip(auto[0][:4], auto[1][:4]):
        assert torch.equal(a, b)
    assert (auto[0].logp - one.logp).abs().max() <= 1e-5 and (auto[0].kl - one.kl).abs().max() <= 1e-5


def test_ppo_kernel_and_gae_kernel_match_torch_on_the_gpu():
    g = torch.Generator(device="cuda").manual_seed(3)
    B, T = 64, 700
    logp = (-torch.rand(B, T, device="cuda", generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.2 * torch.randn(B, T, device="cuda", generator=g)
    adv = torch.randn(B, T, device="cuda", generator=g)
    mask = torch.rand(B, T, device="cuda", generator=g) > 0.1
    kl = (torch.rand(B, T, device="cuda", generator=g) * 0.3).requires_grad_()
    outs = []
    for backend in ("torch", "triton"):
        logp.grad = kl.grad = None
        out = ppo_policy_loss(logp, old, adv, mask, kl=kl, kl_estimator="exact", kl_coef=0.1, dual_clip=3.0,
                              backend=backend)
        out.loss.backward()
        outs.append((out.loss.item(), logp.grad.clone(), kl.grad.clone()))
    (l_t, gl_t, gk_t), (l_k, gl_k, gk_k) = outs
    assert l_k == pytest.approx(l_t, rel=1e-5) and torch.allclose(gl_t, gl_k, atol=1e-7) and torch.allclose(gk_t, gk_k)
    r, v = torch.randn(B, T, device="cuda", generator=g), torch.randn(B, T, device="cuda", generator=g)
    want = gae_reference(r.cpu(), v.cpu(), mask.cpu(), 0.99, 0.95)
    got = gae(r, v, mask, 0.99, 0.95, backend="triton")
    for a, b in zip(got, want):
        assert torch.allclose(a.cpu(), b, atol=1e-4)
