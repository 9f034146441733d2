"""PPO policy loss and clipped value loss on per-token tensors, in torch and as a fused Triton kernel.

Per valid token t, with ratio r = exp(logp - old_logp) and advantage A:

    pg_t   = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))          (Schulman et al. 2017)
             and, with dual clip c > 1, for A < 0: min(pg_t, -A c)        (Ye et al. 2020)
    kl_t   = k1: d,  k2: d^2 / 2,  k3: e^(-d) - 1 + d   with d = logp - ref_logp   (Schulman 2020)
             or exact: sum_j p_j log(p_j / q_j) from ``linear_logprob``
    l_t    = pg_t + kl_coef kl_t - entropy_coef H_t
    loss   = sum_t w_t l_t

The weights w_t encode the aggregation (mask included):
    token_mean:           mask / (number of valid tokens in the batch, or ``normalizer``)
    seq_mean_token_mean:  mask / (tokens of the sequence * number of sequences)
    seq_mean_token_sum:   mask / number of sequences
    token_sum_norm:       mask / (number of sequences * ``normalizer`` or T)   (Dr. GRPO, Liu et al. 2025)

Gradients reach logp (through pg and the sampled KL estimators), the exact KL and the entropy, which
come from ``linear_logprob``; its backward turns them into hidden-state and LM-head gradients.
The Triton path computes l_t and its three partial derivatives in one elementwise pass.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

KLEstimator = Literal["k1", "k2", "k3", "exact"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"]
_KL_MODE = {None: 0, "k1": 1, "k2": 2, "k3": 3, "exact": 4}


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar
    metrics: dict[str, torch.Tensor]  # scalars, detached: pg_loss, clip_fraction, approx_kl, ratio_mean, ...


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, *, clamp: float | None = None,
                log_ratio_clamp: float | None = None) -> torch.Tensor:
    """Sampled per-token KL(pi || ref) estimators at tokens drawn from pi; d = logp - ref_logp.
    k1 = d (unbiased, high variance), k2 = d^2/2, k3 = e^(-d) - 1 + d (unbiased, >= 0).

    Optional clamps, off by default (and then the estimators are exact as written): ``log_ratio_clamp``
    bounds d to [-c, c] before the estimator (verl uses 20 for k3, keeping e^(-d) finite), ``clamp``
    bounds the estimate to [-c, c] (verl and OpenRLHF use 10). Clamped tokens pass no gradient."""
    d = logp - ref_logp
    if log_ratio_clamp is not None:
        d = d.clamp(-log_ratio_clamp, log_ratio_clamp)
    if estimator == "k1":
        est = d
    elif estimator == "k2":
        est = 0.5 * d * d
    elif estimator == "k3":
        est = torch.expm1(-d) + d
    else:
        raise ValueError(f"unknown sampled KL estimator {estimator!r}; expected k1, k2 or k3")
    return est if clamp is None else est.clamp(-clamp, clamp)


def aggregation_weights(
    mask: torch.Tensor,  # (B, T) or (N,)
    aggregation: str,
    normalizer: float | None = None,
) -> torch.Tensor:
    """Per-token weights w_t (same shape as mask, fp32) such that loss = sum w_t l_t."""
    m = mask.float()
    if aggregation == "token_mean":
        return m / (normalizer if normalizer is not None else m.sum().clamp(min=1.0))
    if m.dim() != 2:
        raise ValueError(f"aggregation {aggregation!r} needs (B, T) inputs")
    n_seq = (m.sum(1) > 0).sum().clamp(min=1).float()
    if aggregation == "seq_mean_token_mean":
        return m / (m.sum(1, keepdim=True).clamp(min=1.0) * n_seq)
    if aggregation == "seq_mean_token_sum":
        return m / n_seq
    if aggregation == "token_sum_norm":
        return m / (n_seq * (normalizer if normalizer is not None else m.shape[1]))
    raise ValueError(f"unknown aggregation {aggregation!r}")


def _check_kl(kl_coef, kl_estimator, ref_logp, kl):
    if kl_coef == 0:
        return None
    if kl_estimator == "exact":
        if kl is None:
            raise ValueError("kl_estimator='exact' needs the exact per-token kl from linear_logprob")
    elif ref_logp is None:
        raise ValueError(f"kl_estimator={kl_estimator!r} needs ref_logp")
    return kl_estimator


def _metrics(pg, clipped, logp, old_logp, mask, w, kl_term, entropy):
    m = mask.bool()
    n = m.sum().clamp(min=1)
    d = (logp - old_logp).detach()
    out = {
        "pg_loss": (w * pg).sum().detach(),
        "clip_fraction": (clipped & m).sum() / n,
        "approx_kl": (0.5 * d * d * m).sum() / n,  # k2 estimate of KL(old || new)
        "ratio_mean": (torch.exp(d) * m).sum() / n,
    }
    if kl_term is not None:
        out["kl"] = (kl_term.detach() * m).sum() / n
    if entropy is not None:
        out["entropy"] = (entropy.detach() * m).sum() / n
    return out


def ppo_policy_loss(
    logp: torch.Tensor,  # (B, T) current policy log-probs (differentiable)
    old_logp: torch.Tensor,  # (B, T) log-probs of the policy that sampled
    advantages: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T) 1 on tokens that count
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    kl_clamp: float | None = None,
    log_ratio_clamp: float | None = None,
    aggregation: Aggregation = "token_mean",
    normalizer: float | None = None,
    weights: torch.Tensor | None = None,
    backend: Literal["auto", "torch", "triton"] = "auto",
) -> PolicyLossOutput:
    """Clipped-surrogate PPO loss with optional dual clip, KL penalty and entropy bonus (see module doc).

    ``weights`` (B, T), when given, are the w_t themselves (zero off the mask) and replace ``aggregation``:
    a trainer normalising by totals over micro-batches and ranks passes them. ``kl_clamp`` and
    ``log_ratio_clamp`` apply to the sampled estimators (``kl_estimate``); both default off."""
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs the per-token entropy")
    est = _check_kl(kl_coef, kl_estimator, ref_logp, kl)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    w = aggregation_weights(mask, aggregation, normalizer) if weights is None else weights.float()
    if backend == "auto":
        backend = "triton" if logp.is_cuda else "torch"
    if backend == "triton":
        return _ppo_triton(logp, old_logp, advantages, mask, w, clip_eps, eps_high, dual_clip, entropy,
                           entropy_coef, ref_logp, kl, kl_coef, est, kl_clamp, log_ratio_clamp)
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}")
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped_term = -adv * ratio.clamp(1 - clip_eps, 1 + eps_high)
    pg = torch.maximum(unclipped, clipped_term)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    per_token = pg
    kl_term = None
    if est is not None:
        kl_term = kl if est == "exact" else kl_estimate(logp, ref_logp.detach(), est, clamp=kl_clamp,
                                                         log_ratio_clamp=log_ratio_clamp)
        per_token = per_token + kl_coef * kl_term
    if entropy_coef != 0:
        per_token = per_token - entropy_coef * entropy
    loss = (w * per_token).sum()
    clipped = (clipped_term > unclipped).detach()
    if dual_clip is not None:
        clipped = clipped | ((adv < 0) & (pg.detach() == -adv * dual_clip))
    return PolicyLossOutput(loss, _metrics(pg, clipped, logp, old_logp, mask, w, kl_term, entropy))


def value_loss(
    values: torch.Tensor,  # (B, T) critic outputs (differentiable)
    old_values: torch.Tensor,  # (B, T) values at collection time
    returns: torch.Tensor,  # (B, T) targets, e.g. GAE returns
    mask: torch.Tensor,
    *,
    clip_eps: float | None = 0.2,
    aggregation: Aggregation = "token_mean",
    normalizer: float | None = None,
    weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, -eps, eps); no clip if eps is None.
    ``weights``: explicit per-token w_t, as in ``ppo_policy_loss``."""
    w = aggregation_weights(mask, aggregation, normalizer) if weights is None else weights.float()
    err = (values - returns) ** 2
    if clip_eps is None:
        per_token, clipped = 0.5 * err, torch.zeros_like(mask, dtype=torch.bool)
    else:
        v_clip = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        err_clip = (v_clip - returns) ** 2
        per_token = 0.5 * torch.maximum(err, err_clip)
        clipped = (err_clip > err).detach()
    n = mask.bool().sum().clamp(min=1)
    return PolicyLossOutput((w * per_token).sum(), {
        "value_loss": (w * per_token).sum().detach(),
        "value_clip_fraction": (clipped & mask.bool()).sum() / n,
    })


# ----------------------------------------------------------------------------------------------
# Fused Triton path


def _ppo_triton(logp, old_logp, advantages, mask, w, eps_low, eps_high, dual_clip, entropy, entropy_coef,
                ref_logp, kl, kl_coef, est, kl_clamp=None, log_ratio_clamp=None):
    shape = logp.shape
    flat = [t.reshape(-1).contiguous() if t is not None else None for t in (logp, old_logp, advantages, w, ref_logp, kl, entropy)]
    fn_args = (eps_low, eps_high, dual_clip, entropy_coef, kl_coef, _KL_MODE[est], kl_clamp, log_ratio_clamp)
    loss, per_token_pg, clipped, kl_term = _FusedPPO.apply(*flat, *fn_args)
    kl_view = kl_term.view(shape) if est is not None else None
    metrics = _metrics(per_token_pg.view(shape), clipped.view(shape).bool(), logp, old_logp, mask, w, kl_view, entropy)
    return PolicyLossOutput(loss, metrics)


class _FusedPPO(torch.autograd.Function):
    """loss = sum_t w_t l_t with d loss / d (logp, kl, entropy) computed in the forward kernel."""

    @staticmethod
    def forward(ctx, logp, old_logp, adv, w, ref_logp, kl, entropy, eps_low, eps_high, dual_clip, ent_coef,
                kl_coef, kl_mode, kl_clamp, log_ratio_clamp):
        from ._ppo_triton import launch_ppo_token_kernel  # triton is imported only when this path runs

        loss_t, pg, clipped, kl_term, g_logp, g_kl, g_ent = launch_ppo_token_kernel(
            logp, old_logp, adv, w, ref_logp, kl, entropy, eps_low, eps_high, dual_clip, ent_coef, kl_coef, kl_mode,
            kl_clamp, log_ratio_clamp)
        ctx.save_for_backward(g_logp, g_kl, g_ent)
        ctx.has = (kl_mode == 4, entropy is not None and ent_coef != 0)  # the kernel writes only these
        ctx.mark_non_differentiable(pg, clipped, kl_term)
        return loss_t.sum(), pg, clipped, kl_term

    @staticmethod
    def backward(ctx, g_loss, *_):
        g_logp, g_kl, g_ent = ctx.saved_tensors
        has_kl, has_ent = ctx.has
        return (g_logp * g_loss, None, None, None, None, g_kl * g_loss if has_kl else None,
                g_ent * g_loss if has_ent else None) + (None,) * 8
