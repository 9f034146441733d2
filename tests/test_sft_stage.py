"""The SFT stage end to end: scratch model -> HF export -> a second SFT run starting from that export."""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from rlhf_engine.config import load_config
from rlhf_engine.models import load_hf_model, load_tokenizer
from rlhf_engine.stages.sft import run_sft

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.architecture.hidden_size=64", "model.architecture.intermediate_size=128",
         "model.architecture.num_layers=2", "data.builtin_rows=400", "data.seq_len=128",
         "trainer.micro_batch_size=4", "trainer.eval_every=0", "trainer.eval_batches=2",
         "rollout.max_new_tokens=8", "logging.log_every=5"]


def test_sft_learns_exports_and_resumes_from_export(tmp_path):
    cfg = load_config(ROOT / "configs/sft_tiny.yaml", SMALL + ["trainer.max_steps=25", f"trainer.out_dir={tmp_path / 'a'}"])
    summary = run_sft(cfg)
    run = tmp_path / "a"
    assert {"config.yaml", "metrics.jsonl", "summary.json", "hf"} <= {p.name for p in run.iterdir()}
    assert summary["eval_loss_final"] < summary["eval_loss_initial"] - 1.0  # ~6.2 -> ~3.5 in 25 steps
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25]
    assert train[-1]["loss"] < train[0]["loss"]
    assert len(summary["samples"]) == 4 and all("response" in s for s in summary["samples"])

    # The export is a real HF checkpoint: transformers loads it with the tokenizer and chat template.
    hf = AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    ours = load_hf_model(run / "hf").eval()
    tok = load_tokenizer(run / "hf")
    ids = tok.apply_chat_template([{"role": "user", "content": "Reverse the word 'stone'."}],
                                  add_generation_prompt=True, tokenize=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        assert (hf(ids).logits - ours.logits(ours(ids))).abs().max() <= 1e-5

    # A second run starts from the exported directory (weights, tokenizer and template from disk).
    cfg2 = load_config(ROOT / "configs/sft_tiny.yaml", SMALL + [
        "trainer.max_steps=5", f"trainer.out_dir={tmp_path / 'b'}", "model.architecture=null",
        f"model.hf_path={run / 'hf'}", "optim.warmup_steps=0"])
    summary2 = run_sft(cfg2)
    assert abs(summary2["eval_loss_initial"] - summary["eval_loss_final"]) < 1e-4  # same weights, same eval set
