"""Online RL: how a catalog entry turns a rollout into advantages, and the one loss every algorithm shares.

    settings = resolve("grpo", cfg.algorithm.rl, max_new_tokens=64)   # the entry, defaults filled in
    adv, ret = advantages(settings, scores, kl, mask, values, kl_coef, reduce)   # at collection, (N, T) each
    objective = rl_objective(settings)                                # the trainer's objective

The algorithms themselves (critic or not, where the KL goes, the estimator, the aggregation) are entries
of ``rlhf_engine.catalog.RL_ALGORITHMS``; their advantage estimators live in ``advantages.py``.

The loss per token is ``rlhf_kernels.ppo_policy_loss`` (clipped surrogate, optional KL term and entropy
bonus) plus ``value_coef`` times the clipped value loss for critic algorithms, plus PPO-ptx's
``ptx_coef`` times the next-token loss on pretraining rows (Ouyang et al. 2022, eq. 2). All are
normalised by totals over the whole optimizer step (every micro-batch, every data-parallel rank):
``response_tokens``, ``sequences`` and ``ptx_tokens`` of ``data.streams.StepTotals``.

Conventions to know when moving recipes between frameworks:
- Dr. GRPO's ``token_sum_norm`` divides the token sum by (sequences x ``rollout.max_new_tokens``) over
  the optimizer step: verl's Dr. GRPO divides by ``max_new_tokens`` only, so ours is verl's divided by
  the number of sequences (a constant rescaling of the learning rate, the same direction).
- GRPO's group std has eps = 1e-4 in the denominator, as TRL's GRPOTrainer; verl uses 1e-6.
- The sampled KL estimators are unclamped by default; ``algorithm.rl.kl_clamp`` (verl and OpenRLHF: 10)
  and ``algorithm.rl.log_ratio_clamp`` (verl: 20, for k3) bound them when set.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from rlhf_kernels import ppo_policy_loss, value_loss

from ..catalog import RL_ALGORITHMS, RLAlgorithm
from ..data.packing import IGNORE_INDEX
from ..data.streams import StepTotals
from ..models.roles import Role
from .advantages import AdvantageInputs, Reduce, masked_whiten
from .mismatch import correction_weights, mismatch_sums
from .objective import ModelPass, Objective

if TYPE_CHECKING:  # typing only: the config layer sits above the algorithms
    from ..config import RLConfig


@dataclass(frozen=True)
class RLSettings:
    """An algorithm with every per-algorithm default resolved against ``algorithm.rl``."""

    algorithm: RLAlgorithm
    cfg: "RLConfig"
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


def resolve(name: str, cfg: "RLConfig", *, max_new_tokens: int, temperature: float = 1.0) -> RLSettings:
    spec = RL_ALGORITHMS[name]
    kl_in = cfg.kl_in or spec.kl_in
    estimator = cfg.kl_estimator or ("k3" if kl_in == "loss" else "k1")
    aggregation = cfg.aggregation or spec.aggregation_for(cfg)
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
    """(advantages (N, T), returns (N, T) or None): the entry's estimator, then whitening and the mask."""
    beta = kl_coef if s.kl_in == "reward" else 0.0
    adv, returns = s.algorithm.advantage_fn()(AdvantageInputs(scores, kl, mask, values, beta, s.cfg, reduce))
    if s.whiten_advantages:
        adv = masked_whiten(adv, mask, reduce=reduce)
    return adv * mask.float(), returns


# ---------------------------------------------------------------------------------------------- the loss


def step_weights(mask: torch.Tensor, aggregation: str, totals: StepTotals, max_new_tokens: int) -> torch.Tensor:
    """(n, T) per-token weights normalised by the optimizer step's totals (response tokens, sequences)."""
    m = mask.float()
    if aggregation == "token_mean":
        return m / max(totals["response_tokens"], 1.0)
    n_seq = max(totals["sequences"], 1.0)
    if aggregation == "seq_mean_token_mean":
        return m / (m.sum(dim=1, keepdim=True).clamp(min=1.0) * n_seq)
    if aggregation == "seq_mean_token_sum":
        return m / n_seq
    if aggregation == "token_sum_norm":
        return m / (n_seq * max_new_tokens)
    raise ValueError(f"unknown aggregation {aggregation!r}")


TOKEN_STATS = ("clip_fraction", "approx_kl", "ratio_mean", "entropy", "kl", "value_clip_fraction")


def rl_objective(s: RLSettings) -> Objective:
    """The trainer objective over ``ExperienceBatch`` micro-batches (see the module docstring).

    Stats are sums: token diagnostics over response tokens (reported as the step's token mean), the
    loss parts weighted like the loss itself (reported per sequence, scaled back to the loss's value)."""
    c = s.cfg
    clip = c.clip_eps if s.algorithm.clip else math.inf

    def passes(b) -> list[ModelPass]:
        """The experience pass (policy and, with a critic, value heads; from cached trunk states when
        kept), then PPO-ptx's language-model pass over pretraining rows when mixed in."""
        main = {"input_ids": b.input_ids, "document_ids": b.document_ids, "targets": b.targets,
                "trunk_states": b.trunk_states, "roles": s.train_roles, "temperature": s.temperature}
        out = [ModelPass(main, lambda o, totals: rl_loss(b, o, totals))]
        if b.ptx is not None and c.ptx_coef > 0:
            p = b.ptx
            ptx = {"input_ids": p.input_ids, "document_ids": p.document_ids, "targets": p.labels, "roles": (Role.POLICY,)}
            out.append(ModelPass(ptx, lambda o, totals: ptx_loss(p, o, totals)))
        return out

    def rl_loss(b, out, totals: StepTotals) -> tuple[torch.Tensor, dict[str, float]]:
        w = step_weights(b.mask, s.aggregation, totals, s.max_new_tokens)  # (n, T)
        kl_coef = b.kl_coef if s.kl_in == "loss" else 0.0
        old = out.logp.detach() if b.on_policy else b.old_logp
        # One step per rollout (on-policy) without mis: this forward is the trainer at the sampling weights,
        # so the mismatch and the tis weights come from it (b.old_logp then holds the sampler's log-probs)
        # and the experience pass does not run the policy for them (algorithms/mismatch.py).
        measured_here = b.on_policy and b.is_weight is None
        is_weight = b.is_weight
        if measured_here and c.is_correction == "tis":
            is_weight, _ = correction_weights(old, b.old_logp, b.mask, "tis", c.is_threshold)
        adv = b.advantages if is_weight is None else b.advantages * is_weight  # tis/mis: w * surrogate
        pol = ppo_policy_loss(out.logp, old, adv, b.mask, clip_eps=clip, clip_eps_high=c.clip_eps_high
                              if s.algorithm.clip else None, dual_clip=c.dual_clip if s.algorithm.clip else None,
                              entropy=out.entropy, entropy_coef=c.entropy_coef, ref_logp=b.ref_logp, kl=out.kl,
                              kl_coef=kl_coef, kl_estimator=s.kl_estimator, kl_clamp=c.kl_clamp,
                              log_ratio_clamp=c.log_ratio_clamp, weights=w)
        loss = pol.loss
        n_tok = float(b.mask.float().sum())
        per_seq = totals["sequences"]  # the loss parts are reported per sequence: sum x sequences / sequences
        stats = {k: float(pol.metrics[k]) * n_tok for k in TOKEN_STATS if k in pol.metrics}
        stats["pg_loss"] = float(pol.metrics["pg_loss"]) * per_seq
        if measured_here and c.log_mismatch:
            mm = mismatch_sums(old, b.old_logp, b.mask)
            stats.update({"rollout/mismatch_abs_mean": mm["abs"], "rollout/mismatch_kl": mm["kl"],
                          "rollout/mismatch_abs_max": mm["max"]})
        if s.critic:
            val = value_loss(out.values, b.old_values, b.returns, b.mask, clip_eps=c.value_clip, weights=w)
            loss = loss + c.value_coef * val.loss
            stats["value_loss"] = float(val.metrics["value_loss"]) * per_seq
            stats["value_clip_fraction"] = float(val.metrics["value_clip_fraction"]) * n_tok
        return loss, stats

    def ptx_loss(p, out, totals: StepTotals) -> tuple[torch.Tensor, dict[str, float]]:
        """PPO-ptx (Ouyang et al. 2022): ptx_coef x the pretraining rows' mean token NLL."""
        valid = p.labels.ne(IGNORE_INDEX)
        ptx = -(out.logp * valid).sum() / max(totals["ptx_tokens"], 1.0)
        return c.ptx_coef * ptx, {"ptx_loss": float(ptx.detach()) * totals["sequences"]}

    return Objective(passes, target="sequences", stat_counts={k: "response_tokens" for k in (
        *TOKEN_STATS, "rollout/mismatch_abs_mean", "rollout/mismatch_kl")})


def settings_dict(s: RLSettings) -> dict[str, Any]:
    """The resolved choices, for the run's summary."""
    return {"algorithm": s.algorithm.name, "kl_in": s.kl_in, "kl_estimator": s.kl_estimator,
            "aggregation": s.aggregation, "whiten_advantages": s.whiten_advantages, "critic": s.critic,
            **{k: v for k, v in dataclasses.asdict(s.cfg).items() if k in ("group", "epochs", "kl_coef", "target_kl")}}
