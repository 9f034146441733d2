"""Fused linear log-prob / entropy / exact KL against the materialized fp32 oracle.

Odd shapes (N=37, H=48, V=1031: multiples of no block size), temperature != 1, masked tokens,
non-zero upstream gradients on logp, entropy and KL, both implementations (chunked torch with chunks
smaller than N and V; Triton with several vocabulary splits, interpreted on CPU).
"""

import pytest
import torch

from rlhf_kernels import linear_logprob, reference_logprob
from rlhf_kernels.chunked import ChunkedImpl, ChunkSizes
from rlhf_kernels.reference import linear_logprob_reference

N, H, V = 37, 48, 1031
TEMP = 0.7


def _impl(name):
    if name == "chunked":
        return ChunkedImpl(ChunkSizes(token_chunk=16, vocab_chunk=200))
    from rlhf_kernels.launch import LaunchConfig
    from rlhf_kernels.triton_lm_head import TritonImpl

    if name == "triton_uneven_h":  # H=48 is no multiple of BLOCK_H=32: the masked K steps run
        return TritonImpl(LaunchConfig(block_n=16, block_v=64, block_h=32, num_warps=4, num_stages=1), num_splits=2)
    # 3 vocabulary splits (merged like TP shards); a workspace of 16 tokens x 32 vocabulary rows forces
    # token chunks (and fp32 dW accumulation over them) in backward
    return TritonImpl(num_splits=3, workspace_bytes=16 * 32 * 4)


def _inputs(dtype, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    xp = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    wp = (torch.randn(V, H, generator=g) * scale).to(dtype).requires_grad_()
    xq = torch.randn(N, H, generator=g).to(dtype)
    wq = (torch.randn(V, H, generator=g) * scale).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[[0, 5, 36]] = -100  # masked tokens, including the first and last
    upstream = [torch.randn(N, generator=g) for _ in range(3)]
    return xp, wp, xq, wq, y, upstream


def _run(fn, xp, wp, upstream, use=("logp", "entropy", "kl")):
    xp.grad = wp.grad = None
    out = fn()
    loss = sum((getattr(out, k) * g).sum() for k, g in zip(("logp", "entropy", "kl"), upstream) if k in use)
    loss.backward()
    return out, xp.grad.clone(), wp.grad.clone()


TOL = {torch.float32: dict(out=1e-5, grad=1e-5), torch.float16: dict(out=2e-3, grad=2e-2)}


@pytest.mark.parametrize("impl", ["chunked", "triton", "triton_uneven_h"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_forward_and_grads_match_oracle(impl, dtype):
    xp, wp, xq, wq, y, up = _inputs(dtype)
    want, dx_w, dw_w = _run(lambda: linear_logprob_reference(xp, wp, y, ref_hidden=xq, ref_weight=wq, temperature=TEMP), xp, wp, up)
    got, dx, dw = _run(lambda: linear_logprob(xp, wp, y, ref_hidden=xq, ref_weight=wq, temperature=TEMP,
                                              backend=_impl(impl)), xp, wp, up)
    tol = TOL[dtype]
    for name in ("logp", "entropy", "ref_logp", "kl"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == torch.float32 and g.shape == (N,)
        assert (g - w).abs().max() <= tol["out"] * max(1.0, w.abs().max().item()), name
    assert (got.entropy - want.entropy).abs().max() / want.entropy.abs().max() <= 1e-3
    assert got.logp.max() <= 0.0  # never positive, not clamped
    for g, w in ((dx, dx_w), (dw, dw_w)):
        assert g.dtype == dtype
        assert (g.float() - w.float()).abs().max() <= tol["grad"] * w.float().abs().max(), (g - w).abs().max()
    assert torch.equal(got.is_argmax, want.is_argmax) and got.is_argmax.dtype == torch.bool
    masked = y == -100
    assert torch.all(dx[masked] == 0) and torch.all(got.logp[masked] == 0) and torch.all(got.kl[masked] == 0)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_policy_only_and_kl_free_backward(impl):
    xp, wp, xq, wq, y, up = _inputs(torch.float32, seed=1)
    # policy only: no reference outputs
    want, dx_w, dw_w = _run(lambda: linear_logprob_reference(xp, wp, y, temperature=TEMP), xp, wp, up, ("logp", "entropy"))
    got, dx, dw = _run(lambda: linear_logprob(xp, wp, y, temperature=TEMP, backend=_impl(impl)), xp, wp, up, ("logp", "entropy"))
    assert got.ref_logp is None and got.kl is None
    assert (got.logp - want.logp).abs().max() <= 1e-5 and (got.entropy - want.entropy).abs().max() <= 1e-5
    assert (dx - dx_w).abs().max() <= 1e-5 * dx_w.abs().max() and (dw - dw_w).abs().max() <= 1e-5 * dw_w.abs().max()
    # reference present but only logp used: the backward skips the reference GEMM
    want, dx_w, _ = _run(lambda: linear_logprob_reference(xp, wp, y, ref_hidden=xq, ref_weight=wq), xp, wp, up, ("logp",))
    got, dx, _ = _run(lambda: linear_logprob(xp, wp, y, ref_hidden=xq, ref_weight=wq, backend=_impl(impl)), xp, wp, up, ("logp",))
    assert (dx - dx_w).abs().max() <= 1e-5 * dx_w.abs().max()


def test_reference_only_variant_has_no_gradient():
    _, _, xq, wq, y, _ = _inputs(torch.float32, seed=2)
    wq.requires_grad_()
    got = reference_logprob(xq, wq, y, temperature=TEMP)
    want = linear_logprob_reference(None, None, y, ref_hidden=xq, ref_weight=wq, temperature=TEMP).ref_logp
    assert not got.requires_grad and (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_logp_never_positive_with_peaked_distributions(impl):
    xp, wp, xq, wq, y, _ = _inputs(torch.float32, seed=3, scale=8.0)  # logits in the hundreds
    with torch.no_grad():
        logits = xp @ wp.T
        y = torch.where(torch.arange(N) % 2 == 0, logits.argmax(-1), y.clamp(min=0))  # half are the argmax
        out = linear_logprob(xp, wp, y, ref_hidden=xq, ref_weight=wq, backend=_impl(impl))
    assert out.logp.max() <= 0.0
    assert out.is_argmax[::2].all()  # the even tokens' targets are the argmax
    want = linear_logprob_reference(xp, wp, y, ref_hidden=xq, ref_weight=wq)
    assert torch.equal(out.is_argmax, want.is_argmax)
    assert (out.logp - want.logp).abs().max() <= 1e-5 * max(1.0, want.logp.abs().max().item())


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_two_runs_are_bitwise_equal(impl):
    xp, wp, xq, wq, y, up = _inputs(torch.float32, seed=4)
    runs = [_run(lambda: linear_logprob(xp, wp, y, ref_hidden=xq, ref_weight=wq, backend=_impl(impl)), xp, wp, up)
            for _ in range(2)]
    (o1, dx1, dw1), (o2, dx2, dw2) = runs
    assert all(torch.equal(a, b) for a, b in zip(o1, o2))
    assert torch.equal(dx1, dx2) and torch.equal(dw1, dw2)


def test_leading_dimensions_and_input_checks():
    xp, wp, _, _, y, _ = _inputs(torch.float32, seed=5)
    out = linear_logprob(xp[:36].reshape(4, 9, H), wp, y[:36].reshape(4, 9))
    assert out.logp.shape == (4, 9)
    with pytest.raises(ValueError, match="last dimension"):
        linear_logprob(xp[:, :10], wp, y)
    with pytest.raises(ValueError, match="both ref_hidden and ref_weight"):
        linear_logprob(xp, wp, y, ref_hidden=xp)
    with pytest.raises(ValueError, match="temperature"):
        linear_logprob(xp, wp, y, temperature=0.0)


@pytest.mark.gpu
def test_bf16_triton_on_gpu_meets_kernels_md_targets():
    xp, wp, xq, wq, y, up = _inputs(torch.bfloat16, seed=6)
    xp, wp = xp.detach().cuda().requires_grad_(), wp.detach().cuda().requires_grad_()
    xq, wq, y, up = xq.cuda(), wq.cuda(), y.cuda(), [u.cuda() for u in up]
    # The oracle sees the same bf16-rounded values, upcast: the difference is the kernel's own error.
    x32, w32 = xp.detach().float().requires_grad_(), wp.detach().float().requires_grad_()
    want, dx_w, dw_w = _run(lambda: linear_logprob_reference(x32, w32, y, ref_hidden=xq.float(), ref_weight=wq.float()), x32, w32, up)
    got, dx, dw = _run(lambda: linear_logprob(xp, wp, y, ref_hidden=xq, ref_weight=wq, backend="triton"), xp, wp, up)
    d = (got.logp - want.logp).abs()
    assert d.mean() <= 1e-4 and d.max() <= 2e-3
    assert ((got.entropy - want.entropy).abs() / want.entropy.abs().clamp(min=1e-3)).max() <= 1e-3
    assert (got.kl - want.kl).abs().max() <= 1e-4
    assert got.logp.max() <= 0
    assert (dx.float() - dx_w).abs().max() <= 2e-2 * dx_w.abs().max()
    assert (dw.float() - dw_w).abs().max() <= 2e-2 * dw_w.abs().max()


@pytest.mark.parametrize("impl", ["chunked", "triton", "triton_uneven_h"])
def test_softcapped_logits_gemma_match_oracle(impl):
    """Gemma 2's final logit softcapping inside the kernels: raw logits r (std ~2 here) become
    cap * tanh(r / cap) with cap = 1.5, so the cap bends most of them; values and gradients equal the fp32
    oracle, which itself differs clearly from the uncapped result."""
    xp, wp, xq, wq, y, up = _inputs(torch.float32, seed=2)
    cap = 1.5
    want, dx_w, dw_w = _run(lambda: linear_logprob_reference(xp, wp, y, ref_hidden=xq, ref_weight=wq, temperature=TEMP,
                                                             softcap=cap), xp, wp, up)
    got, dx, dw = _run(lambda: linear_logprob(xp, wp, y, ref_hidden=xq, ref_weight=wq, temperature=TEMP,
                                              softcap=cap, backend=_impl(impl)), xp, wp, up)
    uncapped = linear_logprob_reference(xp, wp, y, ref_hidden=xq, ref_weight=wq, temperature=TEMP)
    assert (want.logp - uncapped.logp).abs().max() > 0.5  # the cap is active
    for name in ("logp", "entropy", "ref_logp", "kl"):
        g, w = getattr(got, name), getattr(want, name)
        assert (g - w).abs().max() <= 1e-5 * max(1.0, w.abs().max().item()), name
    for g, w in ((dx, dx_w), (dw, dw_w)):
        assert (g - w).abs().max() <= 1e-5 * w.abs().max(), (g - w).abs().max()
    with pytest.raises(ValueError, match="softcap must be > 0"):
        linear_logprob(xp, wp, y, softcap=0.0)
