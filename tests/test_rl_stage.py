"""The online RL stage end to end on CPU: PPO, GRPO, RLOO, REINFORCE++ and A2C raise a programmatic reward
with a fixed seed while the KL to the reference stays finite and reported; PPO-ptx keeps the pretraining
loss lower; a run stopped inside a rollout resumes bit for bit; the reward model on the shared trunk
becomes the reward head and initialises the critic."""

import json
import math

import pytest
import torch

from rlhf_engine.config import load_config
from rlhf_engine.data.packing import IGNORE_INDEX
from rlhf_engine.models import load_hf_model
from rlhf_engine.models.roles import Role, RoleModel
from rlhf_engine.models.score import ScoreModel, save_score_model
from rlhf_engine.models.transformer import Transformer, TransformerConfig
from rlhf_engine.rewards import REWARD_FUNCTIONS
from rlhf_engine.stages.rl import run_rl

LOW = 128  # the programmatic reward: the fraction of response tokens with an id below LOW (of 512)


def low_ids(sample) -> float:
    return sum(t < LOW for t in sample.response_ids) / max(len(sample.response_ids), 1)


low_ids.on_samples = True
if "low_ids" not in REWARD_FUNCTIONS:
    REWARD_FUNCTIONS.register("low_ids")(low_ids)

BASE = {
    "model": {"architecture": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 3,
                               "num_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 256},
              "trunk_layers": 1},
    "data": {"seq_len": 96, "builtin_rows": 200, "eval_fraction": 0.1},
    "optim": {"lr": 3.0e-3, "schedule": "constant"},
    "algorithm": {"rl": {"prompts_per_rollout": 8, "group": 4, "kl_coef": 0.01}},
    "rollout": {"max_new_tokens": 12},
    "reward": {"functions": {"low_ids": 1.0}},
    "trainer": {"max_steps": 20, "micro_batch_size": 8, "grad_accum_steps": 4, "eval_every": 0},
    "logging": {"log_every": 1, "progress_bar": False, "tensorboard": False},
}


def _config(tmp_path, name, *overrides):
    import yaml

    recipe = tmp_path / "rl.yaml"
    recipe.write_text(yaml.safe_dump(BASE))
    return load_config(recipe, [f"algorithm.name={name}", f"trainer.out_dir={tmp_path / name}", *overrides])


def _records(run, stage):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("stage") == stage]


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [
    ("ppo", ["algorithm.rl.epochs=2"]),
    ("grpo", []),
    ("rloo", []),
    ("reinforce_pp", []),
    ("a2c", []),
])
def test_rl_raises_the_programmatic_reward(tmp_path, name, extra):
    s = run_rl(_config(tmp_path, name, *extra))
    assert s["finished"] and s["steps"] == 20
    # a random policy scores ~0.25 (a quarter of the vocabulary); 20 steps clearly move it
    assert s["eval_reward_initial"] == pytest.approx(0.21, abs=0.08)
    assert s["eval_reward_final"] - s["eval_reward_initial"] > 0.15, s
    assert math.isfinite(s["eval_kl_final"]) and s["eval_kl_final"] > 0
    rec = _records(tmp_path / name, name)
    rollouts = [r for r in rec if "rollout/kl" in r]
    assert len(rollouts) == s["rollouts"] and all(math.isfinite(r["rollout/kl"]) for r in rollouts)
    steps = [r for r in rec if "loss" in r]
    assert len(steps) == 20 and all(math.isfinite(r["loss"]) for r in steps)
    if name in ("ppo", "a2c"):
        assert all("value_loss" in r for r in steps)
    # the exported policy is a plain HF checkpoint
    assert (tmp_path / name / "hf" / "config.json").exists()


def _pretrain_loss(model: Transformer, rows: list[list[int]]) -> float:
    total = n = 0.0
    with torch.no_grad():
        for ids in rows:
            x = torch.tensor([ids])
            targets = torch.tensor([ids[1:] + [IGNORE_INDEX]])
            out = model(x, targets=targets)
            total -= float(out.logp[targets.ne(IGNORE_INDEX)].sum())
            n += len(ids) - 1
    return total / n


@pytest.mark.slow
def test_ppo_ptx_keeps_the_pretraining_loss_lower(tmp_path):
    from rlhf_engine.data.builtin import demo_conversations
    from rlhf_engine.models import load_tokenizer

    corpus = tmp_path / "pretrain.jsonl"
    texts = [" ".join(m["content"] for m in r["messages"]) for r in demo_conversations(300, seed=7)]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    losses = {}
    for coef in (0.0, 1.0):
        run = f"ptx{coef}"
        s = run_rl(_config(tmp_path, "ppo", f"trainer.out_dir={tmp_path / run}", f"algorithm.rl.ptx_coef={coef}",
                           f"data.pretrain_path={corpus}", "trainer.max_steps=16", "algorithm.rl.ptx_micro_batch_size=2"))
        tok = load_tokenizer(tmp_path / run / "tokenizer")
        rows = [tok(t)["input_ids"][:96] for t in texts[:40]]
        losses[coef] = _pretrain_loss(load_hf_model(tmp_path / run / "hf"), rows)
        if coef:
            assert all("ptx_loss" in r for r in _records(tmp_path / run, "ppo") if "loss" in r)
            assert s["eval_reward_final"] > s["eval_reward_initial"]
    assert losses[1.0] < losses[0.0] - 0.1, losses


@pytest.mark.slow
def test_rl_resumes_inside_a_rollout_bit_for_bit(tmp_path):
    # 4 steps per rollout (32 sequences, micro-batches of 8, 2 per step, 2 epochs): stop after step 3
    common = ["algorithm.rl.epochs=2", "trainer.grad_accum_steps=2", "trainer.max_steps=6",
              "algorithm.rl.target_kl=0.5", "algorithm.rl.kl_horizon=100"]
    full = run_rl(_config(tmp_path, "ppo", *common, f"trainer.out_dir={tmp_path / 'full'}"))
    cut = _config(tmp_path, "ppo", *common, f"trainer.out_dir={tmp_path / 'cut'}", "trainer.save_every=1",
                  "trainer.stop_after=3")
    assert not run_rl(cut)["finished"]
    resumed = run_rl(_config(tmp_path, "ppo", *common, f"trainer.out_dir={tmp_path / 'cut'}", "trainer.save_every=1"))
    assert resumed["resumed"] and resumed["finished"]
    a = [r for r in _records(tmp_path / "full", "ppo") if "loss" in r]
    b = [r for r in _records(tmp_path / "cut", "ppo") if "loss" in r]
    assert [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert (x["loss"], x["grad_norm"]) == (y["loss"], y["grad_norm"]), (x, y)
    assert full["kl_coef_final"] == resumed["kl_coef_final"] != 0.01  # the adaptive coefficient moved
    fa, fb = load_hf_model(tmp_path / "full" / "hf"), load_hf_model(tmp_path / "cut" / "hf")
    assert all(torch.equal(x, y) for x, y in zip(fa.state_dict().values(), fb.state_dict().values()))


def test_reward_model_on_the_shared_trunk_becomes_the_reward_head_and_initialises_the_critic(tmp_path):
    cfg = TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                            num_kv_heads=2, max_position_embeddings=64)
    sft = Transformer(cfg)
    sft.reset_parameters(torch.Generator().manual_seed(0))
    rm = ScoreModel.from_lm(sft, 1, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the RM trained its head: make it differ from the SFT layers
        for p in rm.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
        rm.bias.fill_(-0.5)
    roles = RoleModel.from_sft(sft, 1, reward=rm)
    for role in (Role.CRITIC, Role.REWARD):
        for (name, p), q in zip(roles.head(role).state_dict().items(), rm.head.state_dict().values()):
            assert torch.equal(p, q), (role, name)
    # the reward head on the shared trunk reads the RM's raw scores
    ids = torch.randint(0, 64, (2, 9))
    out = roles(ids, roles={Role.REWARD})
    torch.testing.assert_close(out.rewards - 0.5, rm(ids)[..., 0])

    from rlhf_engine.rollout.assembly import shares_trunk

    assert shares_trunk(rm, sft, 1) and not shares_trunk(rm, sft, 2)
    other = Transformer(cfg)
    other.reset_parameters(torch.Generator().manual_seed(5))
    assert not shares_trunk(rm, other, 1)


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_reward_head_on_the_shared_trunk_scores_like_the_separate_reward_model(tmp_path, monkeypatch, pooling):
    """The stage loads an exported RM trained on the policy's trunk and runs it as the reward head; its
    rewards equal those of the same RM run as a separate model (the path for an RM on another trunk),
    whether the RM reads the last token or the mean over the response."""
    from rlhf_engine.data.builtin import demo_conversations
    from rlhf_engine.data.tokenizer import train_bpe_tokenizer
    from rlhf_engine.rollout import assembly

    tok = train_bpe_tokenizer([m["content"] for r in demo_conversations(200) for m in r["messages"]], vocab_size=512)
    tok.save_pretrained(tmp_path / "tok")
    sft = Transformer(TransformerConfig(**BASE["model"]["architecture"]))
    sft.reset_parameters(torch.Generator().manual_seed(0))  # the stage's scratch model for trainer.seed = 0
    rm = ScoreModel.from_lm(sft, 1, generator=torch.Generator().manual_seed(3), pooling=pooling)
    with torch.no_grad():
        rm.head.score.weight.mul_(50.0)
        rm.bias.fill_(0.25)
    save_score_model(rm, tmp_path / "rm", tokenizer=tok)
    args = ["reward.functions={}", f"reward.preference_path={tmp_path / 'rm'}", f"model.tokenizer_path={tmp_path / 'tok'}",
            "trainer.max_steps=2"]
    shared = run_rl(_config(tmp_path, "ppo", *args, f"trainer.out_dir={tmp_path / 'shared'}"))
    monkeypatch.setattr(assembly, "shares_trunk", lambda *a: False)
    separate = run_rl(_config(tmp_path, "ppo", *args, f"trainer.out_dir={tmp_path / 'separate'}"))
    assert shared["reward_model_on_shared_trunk"] and not separate["reward_model_on_shared_trunk"]
    assert abs(shared["eval_reward_initial"]) > 0.01
    assert shared["eval_reward_initial"] == pytest.approx(separate["eval_reward_initial"], rel=1e-4)
    a = [r["rollout/reward"] for r in _records(tmp_path / "shared", "ppo") if "rollout/reward" in r]
    b = [r["rollout/reward"] for r in _records(tmp_path / "separate", "ppo") if "rollout/reward" in r]
    assert a == pytest.approx(b, rel=1e-4)


def test_prompt_rows_parse_and_bad_rows_name_file_and_line(tmp_path):
    from rlhf_engine.data.prompts import parse_prompt_row
    from rlhf_engine.data.reader import DataError, read_rows

    chat = parse_prompt_row({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]})
    assert chat.text == "Hi?" and chat.answer == "Hello." and chat.prompt[-1].role == "user"
    plain = parse_prompt_row({"prompt": "2 + 2 =", "answer": "4"})
    assert (plain.prompt, plain.answer) == ("2 + 2 =", "4")
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "fine", "answr": "x"}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:2.*answr"):
        read_rows(path, parse_prompt_row)


def test_rl_refuses_sequence_parallel_and_a_missing_reward(tmp_path):
    from rlhf_engine.parallel.dims import LayoutError

    with pytest.raises(LayoutError, match="sequence"):
        run_rl(_config(tmp_path, "ppo", "parallel.sequence_parallel=true"))
    with pytest.raises(Exception, match="RL needs a reward"):
        run_rl(_config(tmp_path, "grpo", "reward.functions={}"))
