"""Benchmark: batched generation, rlhf-engine's generate vs transformers' generate, same weights.

    python benchmarks/bench_generate.py [--batch 16] [--new-tokens 64] [--repeats 3]

A tiny Llama (the quickstart's shape: hidden 128, 4 layers, vocabulary 512) with random weights,
left-padded prompts of mixed lengths, greedy and sampled (T=1, top-p 0.9) decoding with no stop token so
both produce exactly batch * new_tokens tokens. transformers runs with its default dynamic KV cache.
Writes benchmarks/results/generate_<device>.csv with columns
impl,mode,batch,new_tokens,median_ms,tokens_per_s,speedup.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _bench import write_csv
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_engine.models import load_hf_model
from rlhf_engine.rollout import generate

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    hf = LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_hf_model(d).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (int(n),), generator=g).tolist()
               for n in torch.randint(8, 48, (args.batch,), generator=g)]
    P = max(map(len, prompts))
    ids = torch.zeros(args.batch, P, dtype=torch.long)
    mask = torch.zeros(args.batch, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):], mask[b, P - len(p):] = torch.tensor(p), 1
    T = args.new_tokens

    def run_hf(sample: bool):
        return hf.generate(ids, attention_mask=mask, max_new_tokens=T, min_new_tokens=T, do_sample=sample,
                           top_p=0.9 if sample else None, temperature=1.0 if sample else None, pad_token_id=0)

    def run_ours(sample: bool):
        return generate(ours, prompts, max_new_tokens=T, stop_ids=[], pad_id=0, temperature=1.0 if sample else 0.0,
                        top_p=0.9, generator=torch.Generator().manual_seed(0))

    assert [r for r in run_ours(False).responses] == run_hf(False)[:, P:].tolist(), "greedy outputs differ"
    rows = []
    for mode, sample in (("greedy", False), ("sample", True)):
        timings = {}
        for impl, fn in (("transformers", run_hf), ("rlhf_engine", run_ours)):
            with torch.no_grad():
                fn(sample)  # warm-up
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    fn(sample)
                    times.append((time.perf_counter() - t0) * 1e3)
            timings[impl] = statistics.median(times)
        for impl, ms in timings.items():
            rows.append(dict(impl=impl, mode=mode, batch=args.batch, new_tokens=T, median_ms=round(ms, 1),
                             tokens_per_s=round(args.batch * T / ms * 1e3, 1),
                             speedup=round(timings["transformers"] / ms, 2)))
            print(rows[-1], flush=True)
    out = args.out or RESULTS / f"generate_{'cpu' if not torch.cuda.is_available() else 'cuda'}.csv"
    write_csv(rows, out)


if __name__ == "__main__":
    main()
