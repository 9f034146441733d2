"""Sampling: batched, left-padded generation over the KV cache against transformers' own generate."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_engine.models import load_hf_model
from rlhf_engine.rollout import generate, sample_next


def test_greedy_batch_matches_transformers_generate(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)).eval()
    hf.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 61, (n,), generator=g).tolist() for n in (3, 9, 6)]
    stop = 2
    got = generate(ours, prompts, max_new_tokens=12, stop_ids=[stop], pad_id=0, temperature=0.0)
    for prompt, out in zip(prompts, got):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=stop,
                           pad_token_id=0)[0, len(prompt):].tolist()
        if stop in want:
            want = want[: want.index(stop) + 1]
        assert out == want


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    k2 = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(k2.tolist()) == {0, 1}
    p = logits[0].softmax(-1)  # [0.636, 0.234, 0.086, ...]: top_p=0.8 keeps tokens 0 and 1
    p80 = sample_next(logits, temperature=1.0, top_p=0.8, generator=g)
    assert set(p80.tolist()) == {0, 1}
    frac0 = (p80 == 0).float().mean().item()
    assert abs(frac0 - p[0] / (p[0] + p[1])) < 0.04  # renormalised over the kept set
    assert sample_next(logits[:3], temperature=0.0).tolist() == [0, 0, 0]
