"""Advantage estimators, reward shaping and the KL controller of online RL; pure tensor functions.

Token tensors are (N, T) over a rollout's sequences with ``mask`` marking response tokens (the targets a
policy log-prob exists for); a sequence's score is (N,). Sequences of one prompt are consecutive:
rows [g*G, (g+1)*G) are group g.

    shaped rewards (InstructGPT, Ouyang et al. 2022):  r_t = -beta kl_t + [t = last] score
    GAE (PPO, Schulman et al. 2016):                   rlhf_kernels.gae(r, V, mask, gamma, lam)
    n-step (A2C, Mnih et al. 2016; Sparrow):           A_t = sum_{i<n} gamma^i r_{t+i} + gamma^n V_{t+n} - V_t
    GRPO (Shao et al. 2024):                           A_i = (s_i - mean_g s) / (std_g s + eps)
    Dr. GRPO (Liu et al. 2025):                        A_i = s_i - mean_g s
    RLOO (Ahmadian et al. 2024):                       A_i = s_i - 1/(G-1) sum_{j != i} s_j
    REINFORCE++ (Hu 2025):                             G_t = sum_{t' >= t} gamma^(t'-t) r_t', whitened over the batch

Batch statistics that span data-parallel ranks take a ``reduce`` callable summing a 1-D tensor over
them (identity in one process), so every rank whitens with the same global mean and variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from rlhf_kernels import gae

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _local(x: torch.Tensor) -> torch.Tensor:
    return x


def last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """(N, T) bool: True at each row's last response token."""
    m = mask.bool()
    T = m.shape[1]
    idx = torch.arange(T, device=m.device).expand_as(m)
    last = torch.where(m, idx, -1).amax(dim=1, keepdim=True)  # (N, 1), -1 for an empty row
    return m & idx.eq(last)


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor | None, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """(N, T) per-token rewards: -kl_coef * kl_t on response tokens, plus the score at the last one."""
    r = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if kl is not None and kl_coef != 0:
        r = r - kl_coef * kl.float() * mask.float()
    return r + last_token_mask(mask).float() * scores.float()[:, None]


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, reduce: Reduce = _local,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries of every rank (mean kept when not shift_mean); 0 off the mask."""
    m = mask.float()
    stats = reduce(torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()]).double())
    n = stats[0].clamp(min=1)
    mean = stats[1] / n
    var = (stats[2] / n - mean * mean).clamp(min=0) * n / (n - 1).clamp(min=1)  # unbiased, like torch.var
    out = (x - mean.float()) * torch.rsqrt(var.float() + eps)
    if not shift_mean:
        out = out + mean.float()
    return out * m


def group_advantages(scores: torch.Tensor, group: int, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(N,) GRPO advantages: the score minus its group's mean, divided by the group's (unbiased) std
    (Dr. GRPO: ``scale=False``). eps = 1e-4 as in TRL's GRPOTrainer."""
    s = scores.float().view(-1, group)  # (prompts, G)
    adv = s - s.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (s.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group: int) -> torch.Tensor:
    """(N,) RLOO: each score minus the mean of the other G - 1 scores of its group."""
    if group < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    s = scores.float().view(-1, group)
    baseline = (s.sum(dim=1, keepdim=True) - s) / (group - 1)
    return (s - baseline).reshape(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """(N, T) G_t = r_t + gamma G_next over response tokens (masked positions skipped, 0 there)."""
    N, T = rewards.shape
    m = mask.bool()
    out = torch.zeros(N, T, dtype=torch.float32, device=rewards.device)
    nxt = torch.zeros(N, dtype=torch.float32, device=rewards.device)
    for t in reversed(range(T)):
        g = rewards[:, t].float() + gamma * nxt
        out[:, t] = torch.where(m[:, t], g, 0.0)
        nxt = torch.where(m[:, t], g, nxt)
    return out


def nstep_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                     n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A2C: (advantages, returns), (N, T). R_t = sum_{i<n} gamma^i r_{t+i} + gamma^n V_{t+n} over the
    row's response tokens (the sum stops at the episode's end, where V = 0); A_t = R_t - V_t."""
    m = mask.bool()
    adv = torch.zeros(rewards.shape, dtype=torch.float32, device=rewards.device)
    ret = torch.zeros_like(adv)
    for i in range(rewards.shape[0]):
        idx = torch.nonzero(m[i])[:, 0]  # response positions of row i, in order
        if idx.numel() == 0:
            continue
        r, v = rewards[i, idx].float(), values[i, idx].float()
        L = idx.numel()
        R = torch.zeros(L, dtype=torch.float32, device=rewards.device)
        for t in range(L):
            end = min(t + n, L)
            disc = gamma ** torch.arange(end - t, dtype=torch.float32, device=rewards.device)
            R[t] = (disc * r[t:end]).sum() + (gamma ** n * v[end] if end < L else 0.0)
        ret[i, idx] = R
        adv[i, idx] = R - v
    return adv, ret


# ---------------------------------------------------------------------------------------------- estimators
# One per catalog entry (``catalog.RL_ALGORITHMS``): AdvantageInputs -> (advantages (N, T), returns or None),
# before the optional whitening and the final masking, which ``rl.advantages`` applies to all.


@dataclass(frozen=True)
class AdvantageInputs:
    scores: torch.Tensor  # (N,) sequence scores (clipped / whitened as configured)
    kl: torch.Tensor  # (N, T) per-token KL estimate at collection
    mask: torch.Tensor  # (N, T) response tokens
    values: torch.Tensor | None  # (N, T) critic values at collection (critic algorithms)
    kl_coef: float  # beta where the KL goes in the reward; 0 when it goes in the loss
    cfg: Any  # config.RLConfig: gamma, lam, n_step, group, dr_grpo, ...
    reduce: Reduce = _local


def gae_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO: GAE(gamma, lambda) over the KL-shaped per-token rewards."""
    rewards = shaped_rewards(x.scores, x.kl, x.mask, x.kl_coef)  # (N, T)
    return gae(rewards, x.values, x.mask, x.cfg.gamma, x.cfg.lam)


def a2c_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """A2C: n-step returns bootstrapped from the critic, minus the value."""
    rewards = shaped_rewards(x.scores, x.kl, x.mask, x.kl_coef)
    return nstep_advantages(rewards, x.values, x.mask, x.cfg.gamma, x.cfg.n_step)


def reinforce_pp_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """REINFORCE++: the discounted return of the KL-shaped rewards (whitened over the batch afterwards)."""
    rewards = shaped_rewards(x.scores, x.kl, x.mask, x.kl_coef)
    return discounted_returns(rewards, x.mask, x.cfg.gamma), None


def _sequence_scores(x: AdvantageInputs) -> torch.Tensor:
    """(N,) scores minus the sequence-level KL penalty beta * sum_t kl_t (when the KL is in the reward)."""
    seq = x.scores.float()
    if x.kl_coef:
        seq = seq - x.kl_coef * (x.kl.float() * x.mask.float()).sum(dim=1)
    return seq


def grpo_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """GRPO: the group-normalised score on every token (Dr. GRPO: centred, not scaled)."""
    seq_adv = group_advantages(_sequence_scores(x), x.cfg.group, scale=not x.cfg.dr_grpo)
    return seq_adv[:, None] * x.mask.float(), None


def rloo_sequence_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """RLOO: the score minus the mean of the group's other scores, on every token."""
    return rloo_advantages(_sequence_scores(x), x.cfg.group)[:, None] * x.mask.float(), None


class KLController:
    """The KL coefficient beta: fixed, or adaptive (Ziegler et al. 2019, "Fine-Tuning Language Models from
    Human Preferences", sec. 2.2):  e = clip(KL / target - 1, -0.2, 0.2),  beta <- beta (1 + e n / horizon)
    after a rollout of n sequences whose mean summed KL per sequence was KL."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000) -> None:
        self.value, self.target, self.horizon = float(init), target, horizon

    def update(self, kl: float, n_sequences: int) -> float:
        if self.target is not None and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_sequences / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
