"""Iterated RLHF end to end on CPU: two rounds of sample -> label -> retrain RM -> continue RL, with a
programmatic labeler and with people labeling through files."""

import json

import pytest
import torch
import yaml

from rlhf_engine.config import load_config
from rlhf_engine.data.builtin import demo_conversations
from rlhf_engine.data.prompts import PromptRow
from rlhf_engine.data.tokenizer import train_bpe_tokenizer
from rlhf_engine.data.preference import scores_to_ranking
from rlhf_engine.labelers import FileLabeler, LabelsPending, ProgrammaticLabeler
from rlhf_engine.models import load_hf_model, save_hf_model
from rlhf_engine.models.transformer import Transformer, TransformerConfig
from rlhf_engine.rewards import REWARD_FUNCTIONS
from rlhf_engine.stages.iterate import run_iterated


def vowel_share(prompt, response, answer):
    letters = [c for c in response.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / max(len(letters), 1)


if "vowel_share" not in REWARD_FUNCTIONS:
    REWARD_FUNCTIONS.register("vowel_share")(vowel_share)


def test_scores_to_ranking_is_dense_with_ties():
    assert scores_to_ranking([0.5, 2.0, 0.5, -1.0]) == [2, 1, 2, 3]


def test_programmatic_labeler_ranks_by_weighted_functions_and_noise_is_seeded():
    row = PromptRow("Say a word.", None)
    lab = ProgrammaticLabeler({"vowel_share": 1.0})
    assert lab.rank_all([row], [["xyz", "aaa", "abab"]]) == [[3, 1, 2]]
    a = ProgrammaticLabeler({"vowel_share": 1.0}, noise=0.3, seed=4).rank_all([row] * 20, [["xyz", "aaa", "abab"]] * 20)
    b = ProgrammaticLabeler({"vowel_share": 1.0}, noise=0.3, seed=4).rank_all([row] * 20, [["xyz", "aaa", "abab"]] * 20)
    assert a == b and any(r != [3, 1, 2] for r in a)  # noise makes labelers disagree, reproducibly


def test_file_labeler_writes_the_rows_to_rank_and_reads_rankings_back(tmp_path):
    lab = FileLabeler(tmp_path)
    rows = [PromptRow("Q1", None), PromptRow("Q2", None)]
    with pytest.raises(LabelsPending, match="labels.jsonl"):
        lab.rank_all(rows, [["a", "b"], ["c", "d"]])
    todo = [json.loads(line) for line in (tmp_path / "to_label.jsonl").read_text().splitlines()]
    assert todo[1] == {"prompt": "Q2", "responses": ["c", "d"]}
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps({**t, "ranking": [2, 1]}) + "\n" for t in todo))
    assert lab.rank_all(rows, [["a", "b"], ["c", "d"]]) == [[2, 1], [2, 1]]


def _sft_export(path):
    texts = [m["content"] for r in demo_conversations(300) for m in r["messages"]]
    tok = train_bpe_tokenizer(texts, vocab_size=384)
    cfg = TransformerConfig(vocab_size=384, hidden_size=48, intermediate_size=96, num_layers=3, num_heads=4,
                            num_kv_heads=2, max_position_embeddings=128)
    model = Transformer(cfg)
    model.reset_parameters(torch.Generator().manual_seed(0))
    save_hf_model(model, path, tokenizer=tok)


@pytest.mark.slow
def test_iterated_rlhf_runs_two_rounds_end_to_end(tmp_path):
    _sft_export(tmp_path / "sft")
    recipe = {
        "model": {"hf_path": str(tmp_path / "sft"), "trunk_layers": 1},
        "data": {"seq_len": 64, "builtin_rows": 200, "eval_fraction": 0.05},
        "optim": {"lr": 2.0e-3, "schedule": "constant"},
        "algorithm": {"rl": {"prompts_per_rollout": 8, "group": 2, "kl_coef": 0.02, "eval_prompts": 8}},
        "rollout": {"max_new_tokens": 10},
        "reward": {"functions": {"vowel_share": 1.0}},
        "iterate": {"rounds": 2, "prompts_per_round": 24, "responses_per_prompt": 4, "label_noise": 0.02,
                    "rm_steps": 15, "rl_steps": 6},
        "trainer": {"max_steps": 1, "micro_batch_size": 8, "out_dir": str(tmp_path / "run")},
        "logging": {"log_every": 5, "progress_bar": False, "tensorboard": False},
    }
    (tmp_path / "it.yaml").write_text(yaml.safe_dump(recipe))
    s = run_iterated(load_config(tmp_path / "it.yaml"))
    r0, r1 = s["rounds"]
    assert r0["policy"] == str(tmp_path / "sft") and r1["policy"] == str(tmp_path / "run/round_0/rl/hf")
    assert "rm_accuracy_on_new_samples" not in r0 and 0.0 <= r1["rm_accuracy_on_new_samples"] <= 1.0
    assert r0["rm_heldout_accuracy"] > 0.5 and 0.0 <= r1["rm_heldout_accuracy"] <= 1.0 and r0["comparisons"] > 0
    assert r0["reward_model_on_shared_trunk"] and r1["reward_model_on_shared_trunk"]
    # round 1's RM trained on both rounds' comparisons; its RL continued from round 0's policy
    rm_rows = (tmp_path / "run/rankings_all.jsonl").read_text().splitlines()
    assert len(rm_rows) == 48
    cfg1 = yaml.safe_load((tmp_path / "run/round_1/rl/config.yaml").read_text())
    assert cfg1["algorithm"]["rl"]["init_policy_path"] == str(tmp_path / "run/round_0/rl/hf")
    assert cfg1["reward"]["preference_path"] == str(tmp_path / "run/round_1/rm/hf")
    # round 1's policy head started from round 0's export and trained on; the trunk never moves
    start = load_hf_model(tmp_path / "run/round_0/rl/hf").state_dict()
    end = load_hf_model(tmp_path / "run/round_1/rl/hf").state_dict()
    assert torch.equal(start["layers.0.mlp.up_proj.weight"], end["layers.0.mlp.up_proj.weight"])  # frozen trunk
    assert not torch.equal(start["layers.2.mlp.up_proj.weight"], end["layers.2.mlp.up_proj.weight"])
    assert json.loads((tmp_path / "run/summary.json").read_text())["rounds"][1]["round"] == 1

    # people label through files: the run stops asking for labels, and the same command then continues
    recipe["iterate"].update({"labeler": "file", "rounds": 1})
    recipe["trainer"]["out_dir"] = str(tmp_path / "human")
    (tmp_path / "human.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(LabelsPending):
        run_iterated(load_config(tmp_path / "human.yaml"))
    todo = [json.loads(line) for line in (tmp_path / "human/round_0/to_label.jsonl").read_text().splitlines()]
    assert len(todo) == 24 and all(len(t["responses"]) == 4 for t in todo)
    labels = [{**t, "ranking": scores_to_ranking([vowel_share("", y, None) for y in t["responses"]])} for t in todo]
    (tmp_path / "human/round_0/labels.jsonl").write_text("".join(json.dumps(row) + "\n" for row in labels))
    human = run_iterated(load_config(tmp_path / "human.yaml"))
    assert human["rounds"][0]["comparisons"] > 0 and human["rounds"][0]["rm_heldout_accuracy"] is not None
