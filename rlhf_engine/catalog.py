"""The algorithms the engine knows: their names, which stage runs each, and (online RL) their recipe.

    RL_ALGORITHMS["grpo"]            # RLAlgorithm(name="grpo", critic=False, kl_in="loss", ...)
    command_of("sparrow")            # "rm": the CLI subcommand / stage that trains it
    algorithm_names()                # every valid ``algorithm.name``

The config's allowed names (``algorithm.name``, ``iterate.rl_algorithm``, ``pipeline.rl_algorithm``),
the CLI's subcommands and the stage dispatch are all read from here, so adding an online RL algorithm
is one ``RLAlgorithm`` entry: in this file for a built-in, or ``register_rl_algorithm(...)`` from your
own code before the config is loaded (``tests/test_algorithm_registry.py`` registers a toy one and runs
it through the RL stage).

This module imports no torch, so ``rlhf-engine --help`` and ``config show`` stay fast: an entry names
its advantage estimator either directly (a callable) or by import path ("module:function"), resolved on
first use, as packaging entry points are.

=============  ========  ===========  ============================================  ====================
algorithm      critic    KL goes      advantage (``algorithms/advantages.py``)      loss aggregation
=============  ========  ===========  ============================================  ====================
ppo            yes       reward (k1)  GAE(gamma, lambda), whitened                  token mean
a2c            yes       reward (k1)  n-step return - V, whitened, no ratio clip    token mean
grpo           no        loss (k3)    group-normalised score (Dr. GRPO: centred)    per-seq token mean
rloo           no        reward (k1)  score - mean of the other G - 1 (sequence)    token mean
reinforce_pp   no        reward (k1)  discounted return, whitened over the batch    token mean
=============  ========  ===========  ============================================  ====================
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from .registry import Registry

KL_PLACES = ("reward", "loss")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm")


@dataclass(frozen=True)
class RLAlgorithm:
    """One online RL algorithm: its estimator and the defaults ``algorithm.rl`` may override.

    ``advantage(x: algorithms.advantages.AdvantageInputs) -> (advantages (N, T), returns (N, T) or None)``
    sees the rollout's scores (clipped/whitened as configured), the per-token KL estimate, the mask, the
    critic's values and the KL coefficient that applies in the reward (0 when the KL goes in the loss).
    ``aggregation`` is a name from ``AGGREGATIONS`` or a function of ``algorithm.rl`` returning one.
    """

    name: str
    advantage: Callable[..., Any] | str  # a callable, or "module:function" resolved on first use
    critic: bool = False
    kl_in: str = "reward"  # where the KL penalty goes by default: "reward" or "loss"
    kl_estimator: str = "k1"  # default estimator for that placement
    aggregation: str | Callable[[Any], str] = "token_mean"
    whiten_advantages: bool = False
    clip: bool = True  # the PPO ratio clip (A2C: off)
    needs_group: bool = False  # the baseline is the prompt's group: algorithm.rl.group must be >= 2

    def __post_init__(self) -> None:
        if self.kl_in not in KL_PLACES:
            raise ValueError(f"RL algorithm {self.name!r}: kl_in must be one of {KL_PLACES}")
        if isinstance(self.aggregation, str) and self.aggregation not in AGGREGATIONS:
            raise ValueError(f"RL algorithm {self.name!r}: aggregation must be one of {AGGREGATIONS}")

    def advantage_fn(self) -> Callable[..., Any]:
        if callable(self.advantage):
            return self.advantage
        module, _, fn = self.advantage.partition(":")
        return getattr(importlib.import_module(module), fn)

    def aggregation_for(self, rl_cfg: Any) -> str:
        return self.aggregation(rl_cfg) if callable(self.aggregation) else self.aggregation


RL_ALGORITHMS: Registry[RLAlgorithm] = Registry("RL algorithm")


def register_rl_algorithm(algorithm: RLAlgorithm) -> RLAlgorithm:
    """Add an online RL algorithm: ``algorithm.name`` becomes valid everywhere (config, CLI, stage)."""
    return RL_ALGORITHMS.register(algorithm.name)(algorithm)


def _grpo_aggregation(rl_cfg: Any) -> str:
    """GRPO: the per-sequence token mean; Dr. GRPO: the length-unbiased sum over rollout.max_new_tokens."""
    return "token_sum_norm" if rl_cfg.dr_grpo else "seq_mean_token_mean"


_ADV = "rlhf_engine.algorithms.advantages:"
for _entry in (
    RLAlgorithm("ppo", _ADV + "gae_advantages", critic=True, whiten_advantages=True),
    RLAlgorithm("a2c", _ADV + "a2c_advantages", critic=True, whiten_advantages=True, clip=False),
    RLAlgorithm("grpo", _ADV + "grpo_advantages", kl_in="loss", kl_estimator="k3", aggregation=_grpo_aggregation,
                needs_group=True),
    RLAlgorithm("rloo", _ADV + "rloo_sequence_advantages", needs_group=True),
    RLAlgorithm("reinforce_pp", _ADV + "reinforce_pp_advantages", whiten_advantages=True),
):
    register_rl_algorithm(_entry)

# Offline algorithms and the stage (CLI subcommand) that trains each.
OFFLINE = {"sft": "sft", "rm": "rm", "sparrow": "rm", "rules": "rm", "dpo": "dpo"}


def command_of(name: str) -> str:
    """The stage that trains ``name``: sft, rm, dpo or rl."""
    if name in OFFLINE:
        return OFFLINE[name]
    if name in RL_ALGORITHMS:
        return "rl"
    raise KeyError(f"unknown algorithm {name!r}; known: {', '.join(algorithm_names())}")


def commands() -> dict[str, tuple[str, ...]]:
    """Subcommand -> the algorithm names it runs (the first is the default when a recipe names none)."""
    out: dict[str, list[str]] = {}
    for name, command in OFFLINE.items():
        out.setdefault(command, []).append(name)
    out["rl"] = list(RL_ALGORITHMS)
    return {k: tuple(v) for k, v in out.items()}


def algorithm_names() -> list[str]:
    return [*OFFLINE, *RL_ALGORITHMS]
