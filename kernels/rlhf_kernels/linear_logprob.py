"""Log-probs, entropy and exact KL from hidden states and LM-head weights, without [N, V] logits.

    out = linear_logprob(hidden, lm_head_weight, targets, ref_hidden=..., ref_weight=..., temperature=T)
    loss = -(out.logp * mask).sum() + beta * (out.kl * mask).sum() - alpha * (out.entropy * mask).sum()
    loss.backward()

With z = hidden @ weight^T / T and u = ref_hidden @ ref_weight^T / T (with ``softcap``, Gemma 2's final
logit softcapping, the raw logits r become cap * tanh(r / cap) first), per token:
logp = z_y - logsumexp(z), entropy = -sum p log p, ref_logp = u_y - logsumexp(u),
kl = sum_j p_j (log p_j - log q_j) (exact, over the whole vocabulary, not a sampled estimate).

One sweep over the vocabulary keeps an 8-number online state per token (``state``); the backward
recomputes logit tiles and applies the closed-form gradient, so memory is O(N) plus a bounded
workspace. Gradients flow to ``hidden`` and ``weight``; the reference never receives one.

Vocabulary parallel: give each rank its weight shard (rows [vocab_offset, vocab_offset + V_r) of the
full vocabulary), the same hidden states and global target ids, and the tensor-parallel group. One
all-gather of the (N, 8) state merges the shards; the backward all-reduces d hidden. Every rank
returns the same per-token values.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .chunked import ChunkedImpl
from .launch import device_capability
from .state import ZP, dz_coefficients, finalize, merge_across_ranks
from .types import LogprobOutput

_OUTPUTS = ("logp", "entropy", "ref_logp", "kl", "is_argmax")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(backend: Any, device: torch.device):
    """'auto' (Triton on CUDA sm_80 or newer, chunked torch elsewhere), 'triton', 'chunked', or an
    implementation object."""
    if not isinstance(backend, str):
        return backend
    if backend == "auto":
        tensor_cores = device.type == "cuda" and device_capability(device) >= 80
        backend = "triton" if tensor_cores and _triton_available() else "chunked"
    if backend == "triton":
        from .triton_lm_head import TritonImpl

        return TritonImpl()
    if backend == "chunked":
        return ChunkedImpl()
    raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'triton' or 'chunked'")


class _FusedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, wp, xq, wq, targets, temperature, ignore_index, vocab_offset, group, impl, out_shape, softcap):
        has_policy, has_ref = xp is not None, xq is not None
        v_local = (wp if has_policy else wq).shape[0]
        keep = targets != ignore_index  # (N,)
        local = targets - vocab_offset
        y_local = torch.where(keep & (local >= 0) & (local < v_local), local, -1).contiguous()  # (N,)
        inv_temp = 1.0 / temperature
        state = impl.forward_state(xp, wp, xq, wq, y_local, inv_temp, softcap)  # (N, 8)
        if group is not None and dist.get_world_size(group) > 1:
            state = merge_across_ranks(state, group)
        out, saved = finalize(state, keep, has_policy, has_ref)
        ctx.save_for_backward(xp, wp, xq, wq, y_local, keep, saved)
        ctx.config = (has_policy, has_ref, inv_temp, group, impl, softcap)
        ctx.set_materialize_grads(False)
        empty = state.new_zeros(0)
        # Fresh tensors in the caller's shape, never views: an in-place op on a view returned through
        # FSDP2 would silently skip its backward all-gather. The copies are a few N-length vectors.
        results = tuple((out[k] if out[k].shape == out_shape else out[k].reshape(out_shape).clone())
                        if k in out else empty for k in _OUTPUTS)
        ctx.mark_non_differentiable(results[2], results[4])
        return results

    @staticmethod
    def backward(ctx, g_lp, g_h, _g_ref, g_kl, _g_argmax):
        xp, wp, xq, wq, y_local, keep, saved = ctx.saved_tensors
        has_policy, has_ref, inv_temp, group, impl, softcap = ctx.config
        nones = (None,) * 10
        if not has_policy or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return (None, None) + nones
        N, H = xp.shape
        V = wp.shape[0]

        def grad(g):
            return torch.zeros(N, dtype=torch.float32, device=xp.device) if g is None or g.numel() == 0 else g.reshape(N).float()

        g_lp, g_h, g_kl = grad(g_lp), grad(g_h), grad(g_kl)
        need_u = has_ref and bool((g_kl != 0).any())
        coef = dz_coefficients(saved, g_lp, g_h, g_kl, keep).contiguous()  # (N, 4)
        zp = saved[:, ZP].contiguous()  # (N,)
        gemm_dtype = impl.gemm_dtype(xp.dtype)
        token_chunk, vocab_chunk = impl.backward_chunks(N, V)
        accumulate_dw = token_chunk < N  # dW slices summed over token chunks in fp32
        dx = torch.zeros(N, H, dtype=torch.float32, device=xp.device)
        dw = torch.zeros(V, H, dtype=torch.float32 if accumulate_dw else gemm_dtype, device=wp.device)
        for n0 in range(0, N, token_chunk):
            n1 = min(n0 + token_chunk, N)
            x_blk = xp[n0:n1].to(gemm_dtype)
            for v0 in range(0, V, vocab_chunk):
                v1 = min(v0 + vocab_chunk, V)
                dz = impl.dlogits(xp, wp, xq, wq, y_local, zp, coef, inv_temp, n0, n1, v0, v1, need_u, gemm_dtype,
                                  softcap)
                w_blk = wp[v0:v1].to(gemm_dtype)
                if not accumulate_dw:
                    dw[v0:v1] = dz.T @ x_blk  # (v, H), each slice written once
                elif dw.dtype == gemm_dtype:
                    dw[v0:v1].addmm_(dz.T, x_blk)  # in place: no (v, H) temporary
                else:
                    dw[v0:v1] += (dz.T @ x_blk).float()
                if gemm_dtype == torch.float32:
                    dx[n0:n1].addmm_(dz, w_blk)  # (n, H)
                else:
                    dx[n0:n1] += (dz @ w_blk).float()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(dx, group=group)  # every shard's vocabulary contributes to d hidden
        return (dx.to(xp.dtype), dw.to(wp.dtype)) + nones


def _flatten(x: torch.Tensor | None, name: str, H: int | None = None) -> torch.Tensor | None:
    if x is None:
        return None
    if H is not None and x.shape[-1] != H:
        raise ValueError(f"{name} has last dimension {x.shape[-1]}, expected hidden size {H}")
    return x.reshape(-1, x.shape[-1]).contiguous() if x.dim() > 1 else x


def linear_logprob(
    hidden: torch.Tensor | None,  # (..., H) policy hidden states
    weight: torch.Tensor | None,  # (V_r, H) policy LM-head weight (this rank's vocabulary shard)
    targets: torch.Tensor,  # (...) global token ids; ignore_index where masked
    *,
    ref_hidden: torch.Tensor | None = None,  # (..., H) reference hidden states
    ref_weight: torch.Tensor | None = None,  # (V_r, H) reference LM-head weight shard
    temperature: float = 1.0,
    ignore_index: int = -100,
    tp_group: dist.ProcessGroup | None = None,
    vocab_offset: int = 0,
    backend: Any = "auto",
    softcap: float | None = None,
) -> LogprobOutput:
    """Per-token (logp, entropy, ref_logp, kl, is_argmax), shaped like ``targets`` (fp32; is_argmax bool).

    Policy-only (no reference): ref_logp and kl are None. Reference-only (hidden=None): only ref_logp.
    Masked tokens return 0 in every output and pass no gradient.
    """
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("give both ref_hidden and ref_weight, or neither")
    if (hidden is None) != (weight is None):
        raise ValueError("give both hidden and weight, or neither")
    if hidden is None and ref_hidden is None:
        raise ValueError("nothing to compute: no policy and no reference")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 (or None), got {softcap}")
    w_any = weight if weight is not None else ref_weight
    H = w_any.shape[1]
    if weight is not None and ref_weight is not None and weight.shape != ref_weight.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and ref_weight {tuple(ref_weight.shape)} differ")
    shape = targets.shape
    xp, xq = _flatten(hidden, "hidden", H), _flatten(ref_hidden, "ref_hidden", H)
    y = targets.reshape(-1)
    n = (xp if xp is not None else xq).shape[0]
    if y.shape[0] != n:
        raise ValueError(f"{y.shape[0]} targets for {n} hidden states")
    if xq is not None:
        xq = xq.detach()
    impl = resolve_impl(backend, w_any.device)
    outs = _FusedLinearLogprob.apply(
        xp, weight.contiguous() if weight is not None else None, xq,
        ref_weight.detach().contiguous() if ref_weight is not None else None,
        y, float(temperature), ignore_index, vocab_offset, tp_group, impl, tuple(shape), float(softcap or 0.0),
    )
    has = {"logp": xp is not None, "entropy": xp is not None, "ref_logp": xq is not None,
           "kl": xp is not None and xq is not None, "is_argmax": xp is not None}
    return LogprobOutput(*(o if has[k] else None for k, o in zip(_OUTPUTS, outs)))


def reference_logprob(
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    targets: torch.Tensor,
    **kwargs: Any,
) -> torch.Tensor:
    """Reference-only variant: log q(y | x) per token, no gradient (the frozen model's scoring pass)."""
    with torch.no_grad():
        return linear_logprob(None, None, targets, ref_hidden=ref_hidden, ref_weight=ref_weight, **kwargs).ref_logp
