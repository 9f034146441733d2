"""Triton kernel for the per-token part of the PPO loss: l_t and its partial derivatives in one pass.

Outputs per token: w l_t, the surrogate pg_t, a clipped flag, the KL term, and the gradients of
sum_t w_t l_t with respect to logp, the exact KL and the entropy (see ``ppo_loss`` for the formulas).
Where the clipped branch (or the dual clip) is active, pg_t does not depend on logp, so its gradient
is 0; elsewhere it is -A r. Written with tl.exp only (no libdevice), so it also runs interpreted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch as L


@triton.jit
def _ppo_token_kernel(
    logp_ptr, old_ptr, adv_ptr, w_ptr, ref_ptr, kl_ptr, ent_ptr,  # [N] inputs (ref/kl/ent may be dummies)
    loss_ptr, pg_ptr, clipped_ptr, klterm_ptr, g_logp_ptr, g_kl_ptr, g_ent_ptr,  # [N] outputs
    N, eps_low, eps_high, dual_clip, ent_coef, kl_coef, kl_clamp, lr_clamp,
    KL_MODE: tl.constexpr,  # 0 none, 1 k1, 2 k2, 3 k3, 4 exact
    HAS_ENT: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    KL_CLAMP: tl.constexpr,  # clamp the sampled estimate to [-kl_clamp, kl_clamp]
    LR_CLAMP: tl.constexpr,  # clamp d = logp - ref_logp to [-lr_clamp, lr_clamp] first
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    logp = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)

    ratio = tl.exp(logp - old)
    unclipped = -adv * ratio
    clipped_val = -adv * tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    is_clipped = clipped_val > unclipped
    pg = tl.where(is_clipped, clipped_val, unclipped)
    g_pg = tl.where(is_clipped, 0.0, -adv * ratio)
    if HAS_DUAL:
        dual_val = -adv * dual_clip
        dual_active = (adv < 0) & (pg > dual_val)
        pg = tl.where(dual_active, dual_val, pg)
        g_pg = tl.where(dual_active, 0.0, g_pg)
        is_clipped = is_clipped | dual_active
    loss = pg
    g_logp = g_pg
    kl_term = tl.zeros([BLOCK], tl.float32)
    if KL_MODE == 4:
        kl_term = tl.load(kl_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(g_kl_ptr + offs, w * kl_coef, mask=ok)
    elif KL_MODE > 0:
        d = logp - tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        live = tl.full([BLOCK], 1.0, tl.float32)  # 0 where a clamp cuts the gradient
        if LR_CLAMP:
            live = tl.where((d >= -lr_clamp) & (d <= lr_clamp), live, 0.0)
            d = tl.minimum(tl.maximum(d, -lr_clamp), lr_clamp)
        if KL_MODE == 1:
            kl_term = d
            g_kl_d = tl.full([BLOCK], 1.0, tl.float32)
        elif KL_MODE == 2:
            kl_term = 0.5 * d * d
            g_kl_d = d
        else:
            e = tl.exp(-d)
            kl_term = e - 1.0 + d
            g_kl_d = 1.0 - e
        if KL_CLAMP:
            live = tl.where((kl_term >= -kl_clamp) & (kl_term <= kl_clamp), live, 0.0)
            kl_term = tl.minimum(tl.maximum(kl_term, -kl_clamp), kl_clamp)
        g_logp += kl_coef * g_kl_d * live
    loss += kl_coef * kl_term
    if HAS_ENT:
        loss -= ent_coef * tl.load(ent_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(g_ent_ptr + offs, -w * ent_coef, mask=ok)
    tl.store(loss_ptr + offs, w * loss, mask=ok)
    tl.store(pg_ptr + offs, pg, mask=ok)
    tl.store(clipped_ptr + offs, is_clipped.to(tl.int8), mask=ok)
    tl.store(klterm_ptr + offs, kl_term, mask=ok)
    tl.store(g_logp_ptr + offs, w * g_logp, mask=ok)


def ppo_plan(N: int, dtype: torch.dtype, kl_mode: int, has_ent: bool, has_dual: bool, eps_low: float = 0.2,
             eps_high: float = 0.2, dual_clip: float = 0.0, ent_coef: float = 0.0, kl_coef: float = 0.0,
             kl_clamp: float | None = None, lr_clamp: float | None = None) -> L.KernelPlan:
    """The launch for N tokens whose inputs are ``dtype`` (outputs fp32, the clipped flag int8)."""
    block = L.PPO_BLOCK_INTERPRET if L.interpreting() else L.PPO_BLOCK
    names_in = ("logp_ptr", "old_ptr", "adv_ptr", "w_ptr", "ref_ptr", "kl_ptr", "ent_ptr")
    names_out = ("loss_ptr", "pg_ptr", "klterm_ptr", "g_logp_ptr", "g_kl_ptr", "g_ent_ptr")
    pointers = {**{n: dtype for n in names_in}, **{n: torch.float32 for n in names_out}, "clipped_ptr": torch.int8}
    scalars = dict(N=N, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, ent_coef=ent_coef, kl_coef=kl_coef,
                   kl_clamp=float(kl_clamp or 0.0), lr_clamp=float(lr_clamp or 0.0))
    constexprs = dict(KL_MODE=kl_mode, HAS_ENT=has_ent, HAS_DUAL=has_dual, KL_CLAMP=kl_clamp is not None,
                      LR_CLAMP=lr_clamp is not None, BLOCK=block)
    options = {} if L.interpreting() else {"num_warps": L.PPO_WARPS}
    return L.KernelPlan(_ppo_token_kernel, (triton.cdiv(N, block),), pointers, scalars, constexprs, options)


def launch_ppo_token_kernel(logp, old_logp, adv, w, ref_logp, kl, entropy, eps_low, eps_high, dual_clip,
                            ent_coef, kl_coef, kl_mode, kl_clamp=None, lr_clamp=None):
    """Returns (w l, pg, clipped int8, kl term, d/d logp, d/d kl, d/d entropy), each (N,) fp32."""
    N = logp.numel()
    f32 = dict(dtype=torch.float32, device=logp.device)
    loss, pg, kl_term, g_logp, g_kl, g_ent = (torch.empty(N, **f32) for _ in range(6))
    clipped = torch.empty(N, dtype=torch.int8, device=logp.device)
    plan = ppo_plan(N, logp.dtype, kl_mode, has_ent=entropy is not None and ent_coef != 0,
                    has_dual=dual_clip is not None, eps_low=eps_low, eps_high=eps_high,
                    dual_clip=dual_clip if dual_clip is not None else 0.0, ent_coef=ent_coef, kl_coef=kl_coef,
                    kl_clamp=kl_clamp if kl_mode in (1, 2, 3) else None,
                    lr_clamp=lr_clamp if kl_mode in (1, 2, 3) else None)
    plan.run(dict(logp_ptr=logp, old_ptr=old_logp, adv_ptr=adv, w_ptr=w,
                  ref_ptr=ref_logp if ref_logp is not None else logp, kl_ptr=kl if kl is not None else logp,
                  ent_ptr=entropy if entropy is not None else logp, loss_ptr=loss, pg_ptr=pg, clipped_ptr=clipped,
                  klterm_ptr=kl_term, g_logp_ptr=g_logp, g_kl_ptr=g_kl, g_ent_ptr=g_ent))
    return loss, pg, clipped, kl_term, g_logp, g_kl, g_ent
