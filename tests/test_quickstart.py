"""The quickstart pipeline, shortened to seconds: every stage runs, the run directory holds what the
README promises, and the summary's numbers are finite and consistent with the stages' own records."""

import json
import math
import random
from pathlib import Path

import pytest
import yaml

from rlhf_engine.config import load_config
from rlhf_engine.data.task import OBJECTS, build_task, gold_score, label, pair_agreement
from rlhf_engine.stages.pipeline import QUICKSTART, quickstart_config, run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_gold_score_by_hand():
    p = "Describe the lemon."
    assert gold_score(p, "The lemon is bright and calm.") == 3.0  # named + 2 pleasant
    assert gold_score(p, "The stone is dark.") == -1.0  # not named, 1 unpleasant
    assert gold_score(p, "The lemon is bright bright bright.") == 2.0 - 1.0  # repeats cost 0.5 each
    # 14 words: 2 beyond 12
    assert gold_score(p, "The lemon is big and small and old and new and round and tall.") == 1.0 - 0.25 * 2
    assert gold_score(p, "The lemon is lovely and kind and warm.") == 3.0  # at most 2 pleasant count


def test_task_is_deterministic_and_labelers_disagree_sometimes():
    a, b = build_task(3, pretrain_rows=10, demonstrations=10, prompts=10, eval_prompts=5), build_task(3, pretrain_rows=10, demonstrations=10, prompts=10, eval_prompts=5)
    assert a == b and a != build_task(4, pretrain_rows=10, demonstrations=10, prompts=10, eval_prompts=5)
    assert all(any(o in m["content"] for o in OBJECTS) for r in a.demonstrations for m in r["messages"])
    rng = random.Random(0)
    agree = total = 0
    for _ in range(200):
        gold = [rng.uniform(-2, 3) for _ in range(4)]
        x, y = label(gold, 0.75, rng), label(gold, 0.75, rng)
        n, t = pair_agreement(x, y)
        agree, total = agree + n, total + t
    assert 0.6 < agree / total < 0.95
    assert pair_agreement([1, 2, 3], [1, 2, 3]) == (3, 3) and pair_agreement([1, 1, 2], [2, 1, 1]) == (0, 1)


def test_the_packaged_quickstart_recipe_is_configs_quickstart():
    assert yaml.safe_load(QUICKSTART.read_text()) == yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())


SHORT = ["pipeline.pretrain_steps=12", "pipeline.sft_steps=10", "pipeline.rm_steps=8", "pipeline.rl_steps=4",
         "pipeline.ranking_prompts=24", "pipeline.eval_prompts=8", "pipeline.demonstrations=200",
         "pipeline.pretrain_rows=200", "model.architecture.hidden_size=64", "model.architecture.intermediate_size=128",
         "model.architecture.num_layers=2", "trainer.eval_every=2", "algorithm.rl.prompts_per_rollout=8",
         "algorithm.rl.eval_prompts=8", "trainer.micro_batch_size=8", "rollout.max_new_tokens=12",
         "data.seq_len=96", "logging.progress_bar=false"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "dpo"])
def test_shortened_quickstart_writes_the_run_directory(tmp_path, algorithm, capsys):
    out = tmp_path / "qs"
    s = run_pipeline(quickstart_config([f"trainer.out_dir={out}", f"pipeline.rl_algorithm={algorithm}", *SHORT]))
    banners = [line for line in capsys.readouterr().err.splitlines() if line.startswith("== stage ")]
    final = "rl" if algorithm == "ppo" else "dpo"
    assert [b.split(":")[0] for b in banners] == [f"== stage {i}/6" for i in range(1, 7)]  # one banner per stage
    assert [b.split(": ")[1] for b in banners] == ["pretrain", "sft", "rankings", "rm", final, "evaluation"]
    for name in ("summary.json", "report.md", "metrics.jsonl", "data/rankings.jsonl", "pretrain/hf/config.json",
                 "sft/hf/model.safetensors", "rm/hf/config.json", f"{'rl' if algorithm == 'ppo' else 'dpo'}/hf/config.json"):
        assert (out / name).exists(), name
    assert list(out.glob("*/tb/events.*")), "TensorBoard logs"
    assert (out / "losses.png").exists() and (out / "rm_accuracy.png").exists()
    assert (out / "reward_vs_kl.png").exists() == (algorithm == "ppo")
    keys = ("rm_heldout_accuracy", "labeler_agreement", "gold_reward_sft", "gold_reward_rl", "proxy_reward_rl",
            "kl_final", "wall_s")
    assert all(isinstance(s[k], float) and math.isfinite(s[k]) for k in keys), s
    assert 0 <= s["rm_heldout_accuracy"] <= 1 and 0 <= s["labeler_agreement"] <= 1
    assert s["kl_final"] > -0.5 and s["wall_s"] >= sum(s["stage_seconds"].values()) - 1
    assert json.loads((out / "summary.json").read_text())["gold_reward_rl"] == s["gold_reward_rl"]
    assert json.loads((out / "rm/summary.json").read_text())["heldout_accuracy"] == s["rm_heldout_accuracy"]
    stages = {json.loads(line)["pipeline_stage"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"pretrain", "sft", "rm", "rl" if algorithm == "ppo" else "dpo"}
    report = (out / "report.md").read_text()
    assert "Samples before RL" in report and f"{s['gold_reward_rl']:.3f}" in report and "![losses.png]" in report


def test_pipeline_recipe_validates(tmp_path):
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["pipeline.rl_algorithm=grpo", "algorithm.rl.group=4"])
    assert cfg.pipeline.rl_algorithm == "grpo"
    with pytest.raises(Exception, match="pipeline.rl_algorithm"):
        load_config(ROOT / "configs/quickstart.yaml", ["pipeline.rl_algorithm=sac"])


@pytest.mark.slow
def test_pipeline_starts_from_a_local_hf_checkpoint_with_grpo(tmp_path):
    """model.hf_path: no pretraining; SFT starts from the checkpoint with its own tokenizer and template."""
    import torch

    from rlhf_engine.data.task import build_task
    from rlhf_engine.data.tokenizer import train_bpe_tokenizer
    from rlhf_engine.models import load_tokenizer, save_hf_model
    from rlhf_engine.models.transformer import Transformer, TransformerConfig

    task = build_task(0, pretrain_rows=200, demonstrations=50, prompts=10, eval_prompts=5)
    tok = train_bpe_tokenizer([r["text"] for r in task.pretrain], vocab_size=400)
    model = Transformer(TransformerConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_layers=2,
                                          num_heads=4, num_kv_heads=2, max_position_embeddings=128))
    model.reset_parameters(torch.Generator().manual_seed(0))
    save_hf_model(model, tmp_path / "base", tokenizer=tok)
    out = tmp_path / "qs"
    s = run_pipeline(quickstart_config([f"trainer.out_dir={out}", *SHORT, f"model.hf_path={tmp_path / 'base'}",
                                        "model.architecture=null", "pipeline.rl_algorithm=grpo", "algorithm.rl.group=4"]))
    assert not (out / "pretrain").exists() and (out / "rl" / "hf" / "config.json").exists()
    assert s["rl_algorithm"] == "grpo" and math.isfinite(s["gold_reward_rl"])
    assert len(load_tokenizer(out / "sft" / "hf")) == 400  # the checkpoint's own tokenizer, carried through


def test_rankings_compare_each_distinct_sample_once(tmp_path, monkeypatch):
    """Repeated samples of one prompt are ranked once (the ranking format refuses a response twice); a
    prompt left with one distinct sample is skipped; both are counted."""
    from rlhf_engine.data.preference import parse_ranking
    from rlhf_engine.data.reader import read_rows
    from rlhf_engine.stages import pipeline

    samples = [["The lemon is warm.", "The lemon is warm.", "A rock.", "The lemon is bright."],
               ["Same.", "Same.", "Same.", "Same."],
               ["One.", "Two.", "Three.", "Four."]]
    monkeypatch.setattr(pipeline, "sample_from_policy", lambda path, rows, cfg, k, seed: samples[: len(rows)])
    cfg = quickstart_config([f"trainer.out_dir={tmp_path}"])
    prompts = [{"prompt": [{"role": "user", "content": f"Describe the {o}."}]} for o in ("lemon", "stone", "river")]
    stats = pipeline.make_rankings(cfg, "unused", prompts, tmp_path)
    rows = read_rows(tmp_path / "data" / "rankings.jsonl", parse_ranking)
    assert [len(r.responses) for r in rows] == [3, 4]
    assert rows[0].responses == ("The lemon is warm.", "A rock.", "The lemon is bright.")
    assert stats["ranked_prompts"] == 2 and stats["duplicate_samples_dropped"] == 1 + 3
