"""rlhf_kernels: fused LM-head kernels for RLHF (log-probs, entropy, exact KL, PPO loss, GAE).

Depends on torch and triton only, never on rlhf_engine, so other training stacks can use it alone.
Each operation picks Triton on CUDA and a torch implementation elsewhere (``backend=`` overrides):

    linear_logprob(hidden, weight, targets, ref_hidden=, ref_weight=, temperature=, tp_group=, vocab_offset=)
    reference_logprob(ref_hidden, ref_weight, targets)
    ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps=, dual_clip=, kl=, kl_estimator=, ...)
    value_loss(values, old_values, returns, mask, clip_eps=)
    gae(rewards, values, mask, gamma, lam)

The fp32 oracles the tests compare against are in ``rlhf_kernels.reference``.
"""

from .gae import gae
from .linear_logprob import linear_logprob, reference_logprob
from .ppo_loss import PolicyLossOutput, aggregation_weights, kl_estimate, ppo_policy_loss, value_loss
from .types import LogprobOutput

__version__ = "0.1.0"
__all__ = [
    "LogprobOutput",
    "PolicyLossOutput",
    "aggregation_weights",
    "gae",
    "kl_estimate",
    "linear_logprob",
    "ppo_policy_loss",
    "reference_logprob",
    "value_loss",
]
