"""The combined reward equals the weighted sum of its parts, each computed independently."""

import pytest
import torch

from rlhf_engine.config import RewardConfig
from rlhf_engine.models import Transformer, TransformerConfig
from rlhf_engine.models.score import ScoreModel, save_score_model
from rlhf_engine.rewards import REWARD_FUNCTIONS, CombinedReward, Sample

CFG = TransformerConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=64)


def _score_model(outputs, seed):
    lm = Transformer(CFG)
    lm.reset_parameters(torch.Generator().manual_seed(seed))
    return ScoreModel.from_lm(lm, 1, outputs, generator=torch.Generator().manual_seed(seed + 1))


def _samples():
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(1, 50, (n,), generator=g).tolist()  # noqa: E731
    return [Sample(ids(4), ids(3), "What is 2+2?", "4", "4"),
            Sample(ids(6), ids(12), "Say hi as JSON.", '{"hi": 1}', None),
            Sample(ids(2), ids(7), "Repeat.", "a b c a b c a b c", "a b c")]


def test_combined_reward_is_the_weighted_sum_of_independent_parts(tmp_path):
    pref, rules = _score_model(1, 0), _score_model(2, 5)
    save_score_model(pref, tmp_path / "pref")
    save_score_model(rules, tmp_path / "rules", labels=["harm", "spam"])
    cfg = RewardConfig(preference_path=str(tmp_path / "pref"), preference_weight=0.7,
                       rules_path=str(tmp_path / "rules"), rules_weight=0.3, length_target=5, length_weight=2.0,
                       format="json_object", format_weight=0.5, functions={"exact_match": 1.5, "no_repetition": 0.25})
    reward = CombinedReward.from_config(cfg, seq_len=32, pad_id=0)
    samples = _samples()
    got = reward(samples)

    expected = []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            p = pref(ids)[0, -1, 0].item()
            compliance = (1 - torch.sigmoid(rules(ids)[0, -1])).sum().item()
        excess = max(0, len(s.response_ids) - 5) / 5
        fmt = 1.0 if s.response.startswith("{") else 0.0
        em = 1.0 if s.response == s.answer else 0.0
        words = s.response.split()
        grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        rep = 1 - (len(grams) - len(set(grams))) / len(grams) if grams else 1.0
        expected.append(0.7 * p + 0.3 * compliance - 2.0 * excess + 0.5 * fmt + 1.5 * em + 0.25 * rep)
    torch.testing.assert_close(got.total, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert got.parts["exact_match"].tolist() == [1.0, 0.0, 0.0]
    assert got.parts["length_excess"].tolist() == pytest.approx([0.0, 1.4, 0.4])
    assert got.parts["no_repetition"][2].item() == pytest.approx(1 - 4 / 7)


def test_programmatic_rewards_and_unknown_names():
    assert REWARD_FUNCTIONS["exact_match"]("q", " Paris. ", "paris") == 1.0
    assert REWARD_FUNCTIONS["contains_answer"]("q", "It is Paris, France", "paris") == 1.0
    assert REWARD_FUNCTIONS["json_object"]("q", "[1]", None) == 0.0
    # F1 over words: 2 shared of 3 each -> precision = recall = 2/3
    assert REWARD_FUNCTIONS["answer_f1"]("q", "the cat sat", "Cat sat down.") == pytest.approx(2 / 3)
    assert REWARD_FUNCTIONS["answer_f1"]("q", "dog", "cat") == 0.0 == REWARD_FUNCTIONS["answer_f1"]("q", "x", None)
    with pytest.raises(KeyError, match="unknown reward function 'bleu'; registered: answer_f1, contains_answer, exact_match"):
        CombinedReward(RewardConfig(functions={"bleu": 1.0}))
