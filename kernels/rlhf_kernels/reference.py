"""Materialized fp32 oracles for every rlhf_kernels operation.

Plain torch, written for clarity, not speed or memory: full [N, V] logits, Python loops over time.
The tests compare the chunked and Triton paths against these.
"""

from __future__ import annotations

import torch

from .types import LogprobOutput


def linear_logprob_reference(
    hidden: torch.Tensor | None,  # (N, H) policy hidden states
    weight: torch.Tensor | None,  # (V, H) policy LM-head weight
    targets: torch.Tensor,  # (N,) token ids, ignore_index where masked
    *,
    ref_hidden: torch.Tensor | None = None,  # (N, H)
    ref_weight: torch.Tensor | None = None,  # (V, H)
    temperature: float = 1.0,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> LogprobOutput:
    """z = hidden @ weight^T / T, u = ref_hidden @ ref_weight^T / T (fp32; with ``softcap`` the raw logits
    r become cap * tanh(r / cap) before the temperature):
    logp = log_softmax(z)[y], entropy = -sum p log p, ref_logp = log_softmax(u)[y],
    kl = sum_j p_j (log p_j - log q_j). Masked tokens give 0 everywhere."""
    keep = targets != ignore_index  # (N,)
    y = targets.clamp(min=0)[:, None]

    def logprobs(h, w):
        r = h.float() @ w.float().T  # (N, V)
        if softcap:
            r = softcap * torch.tanh(r / softcap)
        return torch.log_softmax(r / temperature, dim=-1)

    logp = entropy = ref_logp = kl = is_argmax = None
    if hidden is not None:
        lp_all = logprobs(hidden, weight)
        logp = torch.where(keep, lp_all.gather(1, y)[:, 0], 0.0)
        entropy = torch.where(keep, -(lp_all.exp() * lp_all).sum(-1), 0.0)
        is_argmax = keep & (lp_all.gather(1, y)[:, 0] >= lp_all.max(-1).values)
    if ref_hidden is not None:
        lq_all = logprobs(ref_hidden, ref_weight).detach()
        ref_logp = torch.where(keep, lq_all.gather(1, y)[:, 0], 0.0)
        if hidden is not None:
            kl = torch.where(keep, (lp_all.exp() * (lp_all - lq_all)).sum(-1), 0.0)
    return LogprobOutput(logp, entropy, ref_logp, kl, is_argmax)


def gae_reference(
    rewards: torch.Tensor,  # (B, T)
    values: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T) bool, valid response tokens
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), one token at a time.

    delta_t = r_t + gamma * V_next - V_t,  A_t = delta_t + gamma * lam * A_next, over valid tokens only:
    masked positions get A = 0 and are skipped by the recursion; after the last valid token V_next = 0.
    Returns (advantages, returns = A + V), both 0 on masked positions.
    """
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float32)
    for b in range(B):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(T)):
            if not mask[b, t]:
                continue
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            next_adv = delta + gamma * lam * next_adv
            adv[b, t] = next_adv
            next_value = float(values[b, t])
    returns = torch.where(mask, adv + values.float(), 0.0)
    return adv, returns


def ppo_token_terms_reference(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> torch.Tensor:
    """Per-token clipped surrogate loss, written out case by case (Schulman et al. 2017; dual clip:
    Ye et al. 2020): l = max(-A r, -A clip(r, 1-clip_low, 1+clip_high)), and for A < 0 at most -A c."""
    out = torch.empty_like(logp, dtype=torch.float32)
    for i in range(logp.numel()):
        r = float(torch.exp(logp.flatten()[i].float() - old_logp.flatten()[i].float()))
        a = float(advantages.flatten()[i])
        r_clipped = min(max(r, 1 - clip_low), 1 + clip_high)
        loss = max(-a * r, -a * r_clipped)
        if dual_clip is not None and a < 0:
            loss = min(loss, -a * dual_clip)
        out.view(-1)[i] = loss
    return out
