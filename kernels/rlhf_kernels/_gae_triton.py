"""Triton reverse-scan kernel for GAE: one program per BLOCK_B rows, sequential over time."""

import torch
import triton
import triton.language as tl

from . import launch as L


@triton.jit
def gae_kernel(
    r_ptr,  # [B, T] fp32 rewards
    v_ptr,  # [B, T] fp32 values
    m_ptr,  # [B, T] int8 valid mask
    adv_ptr,  # [B, T] fp32 out
    ret_ptr,  # [B, T] fp32 out
    B,
    T,
    gamma,
    lam,
    BLOCK_B: tl.constexpr,
):
    rb = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    ok = rb < B
    next_v = tl.zeros([BLOCK_B], tl.float32)
    next_a = tl.zeros([BLOCK_B], tl.float32)
    for i in range(0, T):
        off = rb * T + (T - 1 - i)
        r = tl.load(r_ptr + off, mask=ok, other=0.0)
        v = tl.load(v_ptr + off, mask=ok, other=0.0)
        valid = tl.load(m_ptr + off, mask=ok, other=0) != 0
        a = r + gamma * next_v - v + gamma * lam * next_a
        tl.store(adv_ptr + off, tl.where(valid, a, 0.0), mask=ok)
        tl.store(ret_ptr + off, tl.where(valid, a + v, 0.0), mask=ok)
        next_a = tl.where(valid, a, next_a)
        next_v = tl.where(valid, v, next_v)


def gae_plan(B: int, T: int, gamma: float = 1.0, lam: float = 0.95) -> L.KernelPlan:
    """The launch for B rows of T steps (fp32 rewards and values, int8 mask)."""
    block_b = L.GAE_BLOCK_B_INTERPRET if L.interpreting() else L.GAE_BLOCK_B
    pointers = {"r_ptr": torch.float32, "v_ptr": torch.float32, "m_ptr": torch.int8, "adv_ptr": torch.float32,
                "ret_ptr": torch.float32}
    options = {} if L.interpreting() else {"num_warps": L.GAE_WARPS}
    return L.KernelPlan(gae_kernel, (triton.cdiv(B, block_b),), pointers, dict(B=B, T=T, gamma=gamma, lam=lam),
                        dict(BLOCK_B=block_b), options)
