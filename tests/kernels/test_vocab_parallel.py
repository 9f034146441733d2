"""Vocabulary-parallel linear_logprob under torchrun (gloo): tp=2 and tp=4 equal tp=1, equal
megatron-core's vocab_parallel_cross_entropy (logp = -CE) on the same shards, identical on every rank."""

import pytest
import torch
import torch.distributed as dist

from torchrun_helper import torchrun

N, H = 37, 48


def _shards(V, world):
    sizes = [V // world + (r < V % world) for r in range(world)]  # uneven when world does not divide V
    offsets = [sum(sizes[:r]) for r in range(world)]
    return offsets, sizes


def _tensors(V):
    g = torch.Generator().manual_seed(0)  # identical on every rank
    x = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    xq = torch.randn(N, H, generator=g)
    wq = torch.randn(V, H, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    y[[2, 30]] = -100
    ups = [torch.randn(N, generator=g) for _ in range(3)]
    return x, w, xq, wq, y, ups


def _run(x, w, xq, wq, y, ups, **kw):
    from rlhf_kernels import linear_logprob

    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    out = linear_logprob(x, w, y, ref_hidden=xq, ref_weight=wq, temperature=0.8, backend="chunked", **kw)
    (out.logp * ups[0] + out.entropy * ups[1] + out.kl * ups[2]).sum().backward()
    return out, x.grad, w.grad


def _vocab_parallel_body():
    rank, world = dist.get_rank(), dist.get_world_size()
    V = 1031
    x, w, xq, wq, y, ups = _tensors(V)
    full, dx_full, dw_full = _run(x, w, xq, wq, y, ups)  # tp=1, in process
    offsets, sizes = _shards(V, world)
    lo, hi = offsets[rank], offsets[rank] + sizes[rank]
    part, dx, dw = _run(x, w[lo:hi], xq, wq[lo:hi], y, ups, tp_group=dist.group.WORLD, vocab_offset=lo)
    for name in ("logp", "entropy", "ref_logp", "kl"):
        a, b = getattr(part, name), getattr(full, name)
        assert (a - b).abs().max() <= 1e-5, (name, (a - b).abs().max())
    assert torch.equal(part.is_argmax, full.is_argmax)
    assert (dx - dx_full).abs().max() <= 1e-5 * dx_full.abs().max()
    assert (dw - dw_full[lo:hi]).abs().max() <= 1e-5 * dw_full.abs().max()
    # every rank holds the same bits
    mine = torch.stack([part.logp, part.entropy, part.kl, dx.flatten()[:N]])
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    assert all(torch.equal(gathered[0], g) for g in gathered)


def _megatron_body():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from rlhf_kernels import linear_logprob

    rank, world = dist.get_rank(), dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    V = 1028  # Megatron partitions the vocabulary evenly
    x, w, _, _, y, _ = _tensors(V)
    y = y.clamp(min=0)  # Megatron has no ignore index
    part = V // world
    lo = rank * part
    w_r = w[lo : lo + part]
    ours = linear_logprob(x, w_r, y, tp_group=parallel_state.get_tensor_model_parallel_group(), vocab_offset=lo,
                          backend="chunked").logp
    logits = (x @ w_r.T)[:, None, :]  # (s, b=1, V/tp)
    megatron_ce = vocab_parallel_cross_entropy(logits.clone(), y[:, None])[:, 0]
    assert (ours + megatron_ce).abs().max() <= 1e-5, (ours + megatron_ce).abs().max()
    parallel_state.destroy_model_parallel()


@pytest.mark.dist
@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_equals_tp1(tp):
    torchrun(_vocab_parallel_body, nproc=tp)


@pytest.mark.dist
@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_equals_megatron_cross_entropy(tp):
    torchrun(_megatron_body, nproc=tp)
