"""Online RL algorithms as data: how each turns a rollout into advantages, and the one loss they share.

    settings = resolve("grpo", cfg.algorithm.rl, max_new_tokens=64)   # RL_ALGORITHMS["grpo"], defaults filled in
    adv, ret = advantages(settings, scores, kl, mask, values, kl_coef, reduce)   # at collection, (N, T) each
    loss_fn = rl_objective(settings)                                  # the trainer's objective

=============  ========  ===========  ============================================  ====================
algorithm      critic    KL goes      advantage                                     loss aggregation
=============  ========  ===========  ============================================  ====================
ppo            yes       reward (k1)  GAE(gamma, lambda), whitened                  token mean
a2c            yes       reward (k1)  n-step return - V, whitened, no ratio clip    token mean
grpo           no        loss (k3)    group-normalised score (Dr. GRPO: centred)    per-seq token mean
rloo           no        reward (k1)  score - mean of the other G - 1 (sequence)    token mean
reinforce_pp   no        reward (k1)  discounted return, whitened over the batch    token mean
=============  ========  ===========  ============================================  ====================

The loss per token is ``rlhf_kernels.ppo_policy_loss`` (clipped surrogate, optional KL term and entropy
bonus) plus ``value_coef`` times the clipped value loss for critic algorithms, plus PPO-ptx's
``ptx_coef`` times the next-token loss on pretraining rows (Ouyang et al. 2022, eq. 2). All are
normalised by totals over the whole optimizer step (every micro-batch, every data-parallel rank), which
the experience stream attaches to each micro-batch, so accumulation and data parallelism are plain sums.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from rlhf_kernels import gae, ppo_policy_loss, value_loss

from ..config import RLConfig
from ..models.roles import Role
from .advantages import (
    Reduce,
    discounted_returns,
    group_advantages,
    masked_whiten,
    nstep_advantages,
    rloo_advantages,
    shaped_rewards,
)
from .registry import Registry


@dataclass(frozen=True)
class RLAlgorithm:
    name: str
    critic: bool
    kl_in: str  # default: "reward" or "loss"
    kl_estimator: str  # default for that placement
    aggregation: str
    whiten_advantages: bool
    clip: bool = True


RL_ALGORITHMS: Registry[RLAlgorithm] = Registry("RL algorithm")
for _spec in (
    RLAlgorithm("ppo", critic=True, kl_in="reward", kl_estimator="k1", aggregation="token_mean", whiten_advantages=True),
    RLAlgorithm("a2c", critic=True, kl_in="reward", kl_estimator="k1", aggregation="token_mean", whiten_advantages=True,
                clip=False),
    RLAlgorithm("grpo", critic=False, kl_in="loss", kl_estimator="k3", aggregation="seq_mean_token_mean",
                whiten_advantages=False),
    RLAlgorithm("rloo", critic=False, kl_in="reward", kl_estimator="k1", aggregation="token_mean", whiten_advantages=False),
    RLAlgorithm("reinforce_pp", critic=False, kl_in="reward", kl_estimator="k1", aggregation="token_mean",
                whiten_advantages=True),
):
    RL_ALGORITHMS.register(_spec.name)(_spec)


@dataclass(frozen=True)
class RLSettings:
    """An algorithm with every per-algorithm default resolved against ``algorithm.rl``."""

    algorithm: RLAlgorithm
    cfg: RLConfig
    kl_in: str
    kl_estimator: str
    aggregation: str
    whiten_advantages: bool
    max_new_tokens: int
    temperature: float

    @property
    def critic(self) -> bool:
        return self.algorithm.critic

    @property
    def train_roles(self) -> set[Role]:
        """Heads run in a training forward: the policy, the critic, the reference only for exact KL in the loss."""
        roles = {Role.POLICY}
        if self.critic:
            roles.add(Role.CRITIC)
        if self.kl_in == "loss" and self.kl_estimator == "exact" and self.cfg.kl_coef > 0:
            roles.add(Role.REFERENCE)
        return roles


def resolve(name: str, cfg: RLConfig, *, max_new_tokens: int, temperature: float = 1.0) -> RLSettings:
    spec = RL_ALGORITHMS[name]
    kl_in = cfg.kl_in or spec.kl_in
    estimator = cfg.kl_estimator or ("k3" if kl_in == "loss" else "k1")
    aggregation = cfg.aggregation or ("token_sum_norm" if name == "grpo" and cfg.dr_grpo else spec.aggregation)
    whiten = spec.whiten_advantages if cfg.whiten_advantages is None else cfg.whiten_advantages
    return RLSettings(spec, cfg, kl_in, estimator, aggregation, whiten, max_new_tokens, temperature or 1.0)


# ---------------------------------------------------------------------------------------------- advantages


def advantages(
    s: RLSettings,
    scores: torch.Tensor,  # (N,) sequence scores (already whitened/clipped)
    kl: torch.Tensor,  # (N, T) per-token KL estimate at collection
    mask: torch.Tensor,  # (N, T) response tokens
    values: torch.Tensor | None,  # (N, T) critic values at collection
    kl_coef: float,
    reduce: Reduce,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(advantages (N, T), returns (N, T) or None) for the algorithm's estimator (module table)."""
    c, name = s.cfg, s.algorithm.name
    beta = kl_coef if s.kl_in == "reward" else 0.0
    m = mask.float()
    returns = None
    if name in ("ppo", "a2c", "reinforce_pp"):
        rewards = shaped_rewards(scores, kl, mask, beta)  # (N, T)
        if name == "ppo":
            adv, returns = gae(rewards, values, mask, c.gamma, c.lam)
        elif name == "a2c":
            adv, returns = nstep_advantages(rewards, values, mask, c.gamma, c.n_step)
        else:
            adv = discounted_returns(rewards, mask, c.gamma)
    else:
        seq_scores = scores.float()
        if beta:  # sequence-level KL penalty (RLOO): the summed per-token KL
            seq_scores = seq_scores - beta * (kl.float() * m).sum(dim=1)
        if name == "grpo":
            seq_adv = group_advantages(seq_scores, c.group, scale=not c.dr_grpo)
        else:
            seq_adv = rloo_advantages(seq_scores, c.group)
        adv = seq_adv[:, None] * m  # (N, T): every token of a sequence shares its advantage
    if s.whiten_advantages:
        adv = masked_whiten(adv, mask, reduce=reduce)
    return adv * m, returns


# ---------------------------------------------------------------------------------------------- the loss


def step_weights(mask: torch.Tensor, aggregation: str, totals: dict[str, float], max_new_tokens: int) -> torch.Tensor:
    """(n, T) per-token weights normalised by the optimizer step's totals (``tokens``, ``sequences``)."""
    m = mask.float()
    if aggregation == "token_mean":
        return m / max(totals["tokens"], 1.0)
    n_seq = max(totals["sequences"], 1.0)
    if aggregation == "seq_mean_token_mean":
        return m / (m.sum(dim=1, keepdim=True).clamp(min=1.0) * n_seq)
    if aggregation == "seq_mean_token_sum":
        return m / n_seq
    if aggregation == "token_sum_norm":
        return m / (n_seq * max_new_tokens)
    raise ValueError(f"unknown aggregation {aggregation!r}")


def rl_objective(s: RLSettings):
    """The trainer objective over ``ExperienceBatch`` micro-batches (see the module docstring).

    Stats are returned as sums that the trainer divides by the step's sequence count: token-level
    diagnostics are pre-scaled so that their reported value is the exact mean over the step's tokens."""
    c = s.cfg
    clip = c.clip_eps if s.algorithm.clip else math.inf

    def loss_fn(model, b, num_targets: int) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(b.input_ids, document_ids=b.document_ids, targets=b.targets, trunk_states=b.trunk_states,
                    roles=s.train_roles, temperature=s.temperature)
        w = step_weights(b.mask, s.aggregation, b.totals, s.max_new_tokens)  # (n, T)
        kl_coef = b.kl_coef if s.kl_in == "loss" else 0.0
        old = out.logp.detach() if b.on_policy else b.old_logp
        pol = ppo_policy_loss(out.logp, old, b.advantages, b.mask, clip_eps=clip, clip_eps_high=c.clip_eps_high
                              if s.algorithm.clip else None, dual_clip=c.dual_clip if s.algorithm.clip else None,
                              entropy=out.entropy, entropy_coef=c.entropy_coef, ref_logp=b.ref_logp, kl=out.kl,
                              kl_coef=kl_coef, kl_estimator=s.kl_estimator, weights=w)
        loss = pol.loss
        tok = num_targets / max(b.totals["tokens"], 1.0)  # token sum -> reported token mean
        n_tok = b.mask.float().sum()
        stats = {k: float(pol.metrics[k]) * float(n_tok) * tok
                 for k in ("clip_fraction", "approx_kl", "ratio_mean", "entropy", "kl") if k in pol.metrics}
        stats["pg_loss"] = float(pol.metrics["pg_loss"]) * num_targets
        if s.critic:
            val = value_loss(out.values, b.old_values, b.returns, b.mask, clip_eps=c.value_clip, weights=w)
            loss = loss + c.value_coef * val.loss
            stats["value_loss"] = float(val.metrics["value_loss"]) * num_targets
            stats["value_clip_fraction"] = float(val.metrics["value_clip_fraction"]) * float(n_tok) * tok
        if b.ptx is not None and c.ptx_coef > 0:
            p = b.ptx
            logp = model(p.input_ids, document_ids=p.document_ids, targets=p.labels, roles={Role.POLICY}).logp
            valid = p.labels.ne(-100)
            ptx = -(logp * valid).sum() / max(b.totals["ptx_tokens"], 1.0)
            loss = loss + c.ptx_coef * ptx
            stats["ptx_loss"] = float(ptx.detach()) * num_targets
        return loss, stats

    return loss_fn


def settings_dict(s: RLSettings) -> dict[str, Any]:
    """The resolved choices, for the run's summary."""
    return {"algorithm": s.algorithm.name, "kl_in": s.kl_in, "kl_estimator": s.kl_estimator,
            "aggregation": s.aggregation, "whiten_advantages": s.whiten_advantages, "critic": s.critic,
            **{k: v for k, v in dataclasses.asdict(s.cfg).items() if k in ("group", "epochs", "kl_coef", "target_kl")}}
