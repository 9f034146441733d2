"""Triton reverse-scan kernel for GAE: one program per BLOCK_B rows, sequential over time."""

import triton
import triton.language as tl


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
