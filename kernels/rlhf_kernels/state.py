"""Per-token online-softmax state over a vocabulary: merge, finalize, backward coefficients.

Notation: z = policy logits / T, u = reference logits / T over the vocabulary, y the target.
One sweep over a vocabulary slice leaves 8 fp32 numbers per token (``STATE_WIDTH``):

    m  = max_j z_j            s  = sum_j e^(z_j - m)       a = sum_j e^(z_j - m) z_j
    c  = sum_j e^(z_j - m) u_j
    mq = max_j u_j            sq = sum_j e^(u_j - mq)
    zy = z_y, uy = u_y        (0 unless y falls in the slice)

States of disjoint slices (vocabulary splits inside a kernel, or tensor-parallel shards) merge
exactly: with M = max_r m_r, s = sum_r s_r e^(m_r - M), likewise a and c (and sq against mq), and
zy, uy summed. From the merged state:

    Z_p = m + log s,  logp = zy - Z_p,  E_p[z] = a / s,  entropy = Z_p - E_p[z]
    Z_q = mq + log sq,  ref_logp = uy - Z_q
    KL(p || q) = (E_p[z] - Z_p) - (c / s - Z_q)

logp <= 0 holds exactly in floating point: the slice holding the maximum contributes e^0 = 1 to s,
so log s >= 0, and zy <= m.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

M, S, A, C, MQ, SQ, ZY, UY = range(8)
STATE_WIDTH = 8
# Saved for backward, per token: Z_p, Z_q, E_p[z], KL.
ZP, ZQ, EZ, KL = range(4)


def merge(states: torch.Tensor) -> torch.Tensor:
    """(R, N, 8) states of R disjoint vocabulary slices -> (N, 8), summed in slice order (deterministic)."""
    m_all, mq_all = states[..., M], states[..., MQ]  # (R, N)
    m, mq = m_all.max(dim=0).values, mq_all.max(dim=0).values  # (N,)
    scale = torch.exp(m_all - m)  # (R, N); 0 for an empty slice (m_r = -inf)
    scale_q = torch.exp(mq_all - mq)
    out = torch.empty_like(states[0])
    out[:, M], out[:, MQ] = m, mq
    out[:, S] = (states[..., S] * scale).sum(0)
    out[:, A] = (states[..., A] * scale).sum(0)
    out[:, C] = (states[..., C] * scale).sum(0)
    out[:, SQ] = (states[..., SQ] * scale_q).sum(0)
    out[:, ZY] = states[..., ZY].sum(0)
    out[:, UY] = states[..., UY].sum(0)
    return out


def merge_across_ranks(state: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Vocabulary-parallel merge: one all-gather of (N, 8) fp32 per rank, then ``merge`` in rank order.

    Every rank ends with the same bits: the same inputs reduced in the same order.
    """
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(state) for _ in range(world)]
    dist.all_gather(gathered, state.contiguous(), group=group)
    return merge(torch.stack(gathered))


def finalize(
    state: torch.Tensor, keep: torch.Tensor, has_policy: bool, has_ref: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-token outputs from a merged (N, 8) state, zeroed where ``keep`` is False; and the (N, 4)
    statistics the backward needs (Z_p, Z_q, E_p[z], KL)."""
    zero = torch.zeros((), dtype=state.dtype, device=state.device)
    out: dict[str, torch.Tensor] = {}
    saved = torch.zeros(state.shape[0], 4, dtype=state.dtype, device=state.device)
    if has_policy:
        zp = state[:, M] + torch.log(state[:, S])
        ez = state[:, A] / state[:, S]
        out["logp"] = torch.where(keep, state[:, ZY] - zp, zero)
        out["entropy"] = torch.where(keep, zp - ez, zero)
        out["is_argmax"] = keep & (state[:, ZY] >= state[:, M])  # z_y is the maximum itself, bit for bit
        saved[:, ZP], saved[:, EZ] = zp, ez
    if has_ref:
        zq = state[:, MQ] + torch.log(state[:, SQ])
        out["ref_logp"] = torch.where(keep, state[:, UY] - zq, zero)
        saved[:, ZQ] = zq
        if has_policy:
            kl = (saved[:, EZ] - saved[:, ZP]) - (state[:, C] / state[:, S] - zq)
            out["kl"] = torch.where(keep, kl, zero)
            saved[:, KL] = kl
    return out, saved


def dz_coefficients(
    saved: torch.Tensor,  # (N, 4)
    g_lp: torch.Tensor,  # (N,)
    g_h: torch.Tensor,
    g_kl: torch.Tensor,
    keep: torch.Tensor,
) -> torch.Tensor:
    """(N, 4) per-token (g_lp, A, B, C) of the closed-form logit gradient

        dz_j = g_lp 1[j = y] + p_j (A + B z_j + C u_j),  p_j = e^(z_j - Z_p),
        A = -g_lp + g_H E_p[z] + g_KL (Z_q - Z_p - KL),  B = g_KL - g_H,  C = -g_KL,

    from d logp/dz_j = 1[j=y] - p_j, d H/dz_j = p_j (E_p[z] - z_j), d KL/dz_j = p_j (z_j - u_j + Z_q - Z_p - KL).
    Rows of masked tokens are 0, so they contribute no gradient.
    """
    k = keep.to(saved.dtype)
    g_lp, g_h, g_kl = g_lp * k, g_h * k, g_kl * k
    coef = torch.empty(saved.shape[0], 4, dtype=saved.dtype, device=saved.device)
    coef[:, 0] = g_lp
    coef[:, 1] = -g_lp + g_h * saved[:, EZ] + g_kl * (saved[:, ZQ] - saved[:, ZP] - saved[:, KL])
    coef[:, 2] = g_kl - g_h
    coef[:, 3] = -g_kl
    return coef
