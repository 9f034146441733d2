"""Generalized advantage estimation (Schulman et al. 2016) as a reverse scan per sequence.

    delta_t = r_t + gamma V_next - V_t,    A_t = delta_t + gamma lam A_next,    R_t = A_t + V_t

over the valid tokens of each row (``mask``): masked positions get A = R = 0 and are skipped by the
recursion, so left or right padding (or masked tool tokens) need no special handling; after a row's
last valid token V_next = 0 (the episode ends). The scan is sequential in t and parallel over rows:
torch loops over T with rows vectorized; the Triton kernel gives each program BLOCK_B rows.
"""

from __future__ import annotations

import torch


def _gae_torch(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    r, v, m = rewards.float(), values.float(), mask.bool()
    adv = torch.zeros(B, T, dtype=torch.float32, device=rewards.device)
    next_v = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    next_a = torch.zeros_like(next_v)
    for t in reversed(range(T)):
        a = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a
        valid = m[:, t]
        adv[:, t] = torch.where(valid, a, 0.0)
        next_a = torch.where(valid, a, next_a)
        next_v = torch.where(valid, v[:, t], next_v)
    return adv, torch.where(m, adv + v, 0.0)


def _gae_triton(rewards, values, mask, gamma, lam):
    from ._gae_triton import gae_plan  # triton is imported only when this backend runs

    B, T = rewards.shape
    r, v = rewards.float().contiguous(), values.float().contiguous()
    m = mask.to(torch.int8).contiguous()
    adv, ret = torch.empty_like(r), torch.empty_like(r)
    gae_plan(B, T, gamma, lam).run(dict(r_ptr=r, v_ptr=v, m_ptr=m, adv_ptr=adv, ret_ptr=ret))
    return adv, ret


def gae(
    rewards: torch.Tensor,  # (B, T) per-token rewards (e.g. -beta KL, plus the score at the last token)
    values: torch.Tensor,  # (B, T) critic values
    mask: torch.Tensor,  # (B, T) valid response tokens
    gamma: float = 1.0,
    lam: float = 0.95,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T) fp32. backend: 'auto' (Triton on CUDA), 'triton' or 'torch'."""
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must all be (B, T)")
    if backend == "auto":
        backend = "triton" if rewards.is_cuda else "torch"
    if backend == "triton":
        return _gae_triton(rewards, values, mask, gamma, lam)
    if backend == "torch":
        return _gae_torch(rewards, values, mask, gamma, lam)
    raise ValueError(f"unknown backend {backend!r}")
