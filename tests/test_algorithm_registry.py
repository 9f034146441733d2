"""Adding an online RL algorithm is one registry entry: a toy one, registered here, is accepted by the
config, listed by the CLI, dispatched to the RL stage and trained there with its own advantage function."""

import pytest

import test_rl_stage  # beside this file: its tiny model, programmatic reward and config builder
from rlhf_engine.catalog import RL_ALGORITHMS, RLAlgorithm, command_of, register_rl_algorithm
from rlhf_engine.cli import build_parser
from rlhf_engine.config import ConfigError
from rlhf_engine.stages import runner

CALLS = []


def centred_score(x):
    """A toy REINFORCE: each sequence's score minus the rollout mean, on every response token."""
    CALLS.append(x.scores.shape[0])
    adv = (x.scores - x.scores.mean())[:, None] * x.mask.float()
    return adv, None


@pytest.fixture
def toy():
    entry = register_rl_algorithm(RLAlgorithm("toy_reinforce", centred_score, kl_in="reward"))
    yield entry
    RL_ALGORITHMS.unregister("toy_reinforce")


def test_a_registered_algorithm_is_valid_everywhere_and_trains(tmp_path, toy):
    cfg = test_rl_stage._config(tmp_path, "toy_reinforce", "trainer.max_steps=2")
    assert cfg.algorithm.name == "toy_reinforce" and command_of("toy_reinforce") == "rl"
    assert "toy_reinforce" in " ".join(build_parser().format_help().split())  # the rl subcommand's help lists it
    summary = runner("toy_reinforce")(cfg)
    assert summary["algorithm"] == "toy_reinforce" and summary["steps"] == 2 and summary["finished"]
    assert CALLS and all(n == 32 for n in CALLS)  # its estimator saw every rollout (8 prompts x group 4)
    assert summary["critic"] is False


def test_unknown_and_unregistered_names_fail_with_the_key_path(tmp_path):
    with pytest.raises(ConfigError, match=r"'algorithm.name'.*unknown algorithm 'toy_reinforce'"):
        test_rl_stage._config(tmp_path, "toy_reinforce")
    with pytest.raises(KeyError, match="unknown algorithm"):
        command_of("nope")


def test_builtin_entries_carry_their_recipe():
    ppo, grpo = RL_ALGORITHMS["ppo"], RL_ALGORITHMS["grpo"]
    assert ppo.critic and ppo.kl_in == "reward" and ppo.whiten_advantages and ppo.advantage_fn().__name__ == "gae_advantages"
    assert not grpo.critic and grpo.kl_in == "loss" and grpo.kl_estimator == "k3" and grpo.needs_group
    from rlhf_engine.config import RLConfig

    assert grpo.aggregation_for(RLConfig()) == "seq_mean_token_mean"
    assert grpo.aggregation_for(RLConfig(dr_grpo=True)) == "token_sum_norm"
    with pytest.raises(ValueError, match="kl_in"):
        RLAlgorithm("bad", centred_score, kl_in="nowhere")
