"""The gap between the sampler's log-probs and the trainer's, measured and corrected.

The rollout's sampler and the trainer compute log pi(y_t) of the same sampled tokens at the same weights,
but through different numerics (a KV-cached decode against a packed forward; elsewhere another engine, a
lower precision, other kernels). With s_t = log pi_sampler(y_t), l_t = log pi_trainer(y_t) and the ratio
rho_t = exp(l_t - s_t) on response tokens:

    mismatch_abs_mean = mean |l_t - s_t|,  mismatch_abs_max = max |l_t - s_t|
    mismatch_kl       = mean (rho_t - 1 - log rho_t)   (k3 estimate of KL(sampler || trainer); the tokens
                                                        were drawn from the sampler)

Corrections (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training";
the masked form is IcePop, Ling team 2025), as per-token weights on the policy-gradient term:

    tis: w_t = min(rho_t, C)                                  every token kept
    mis: w_t = rho_t if 1/C <= rho_t <= C, the token dropped otherwise (from the whole per-token loss
         and from its token count, so rejected tokens do not dilute the average)

The weights are constants (no gradient). Scaling the advantage by w_t > 0 scales PPO's clipped surrogate,
dual clip included, by exactly w_t, which is how the loss applies them.
"""

from __future__ import annotations

from typing import Literal

import torch

Correction = Literal["none", "tis", "mis"]


def mismatch_sums(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Sums over this rank's response tokens (N, T) each: ``abs`` and ``kl`` sums, ``max`` and ``tokens``;
    ``mismatch_metrics`` turns global sums into the logged means."""
    m = mask.bool()
    delta = (trainer_logp - sampler_logp).float()[m]  # (n,) l - s
    if delta.numel() == 0:
        return {"abs": 0.0, "kl": 0.0, "max": 0.0, "tokens": 0.0}
    k3 = torch.expm1(delta) - delta  # rho - 1 - log rho >= 0
    return {"abs": float(delta.abs().sum()), "kl": float(k3.sum()), "max": float(delta.abs().max()),
            "tokens": float(delta.numel())}


def mismatch_metrics(sums: dict[str, float], max_abs: float) -> dict[str, float]:
    """The logged numbers from global ``mismatch_sums`` and the global maximum."""
    n = max(sums["tokens"], 1.0)
    return {"mismatch_abs_mean": sums["abs"] / n, "mismatch_abs_max": max_abs, "mismatch_kl": sums["kl"] / n}


def correction_weights(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, mode: Correction,
                       threshold: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weights (N, T) fp32, 0 off the mask, or None; kept tokens (N, T) bool, or None when all are kept)."""
    if mode == "none":
        return None, None
    m = mask.bool()
    rho = torch.exp((trainer_logp - sampler_logp).float()).masked_fill(~m, 0.0)  # (N, T)
    if mode == "tis":
        return rho.clamp(max=threshold), None
    if mode == "mis":
        keep = m & (rho >= 1.0 / threshold) & (rho <= threshold)
        return rho * keep, keep
    raise ValueError(f"unknown is_correction {mode!r}; expected none, tis or mis")
