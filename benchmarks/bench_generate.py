"""Benchmark: batched generation, rlhf-engine's generate vs transformers' generate, same weights.

    python benchmarks/bench_generate.py [--batch 16] [--new-tokens 64] [--repeats 3] [--modes eager]
    python benchmarks/bench_generate.py --modes eager,static,compiled     # on a GPU: CUDA graphs

A tiny Llama (the quickstart's shape: hidden 128, 4 layers, vocabulary 512) with random weights,
left-padded prompts of mixed lengths, greedy and sampled (T=1, top-p 0.9) decoding with no stop token so
both produce exactly batch * new_tokens tokens. transformers runs with its default dynamic KV cache.
``--modes``: the engine's ``rollout.decode_mode`` values to time (eager; static, a fixed-shape KV cache;
compiled, its decode step through torch.compile, CUDA graphs on a GPU), each checked to give
transformers' greedy tokens; compilation happens in the warm-up, outside the timing. On a GPU the peak
memory of each run is measured too. Writes benchmarks/results/generate_<device>.csv with columns
impl,mode,batch,new_tokens,median_ms,tokens_per_s,speedup,peak_mem_mb.
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
    parser.add_argument("--modes", default="eager", help="comma-separated rollout.decode_mode values")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    hf = LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_hf_model(d).eval().to(device)
    hf = hf.to(device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (int(n),), generator=g).tolist()
               for n in torch.randint(8, 48, (args.batch,), generator=g)]
    P = max(map(len, prompts))
    ids = torch.zeros(args.batch, P, dtype=torch.long)
    mask = torch.zeros(args.batch, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):], mask[b, P - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)
    T = args.new_tokens
    modes = args.modes.split(",")

    def run_hf(sample: bool):
        return hf.generate(ids, attention_mask=mask, max_new_tokens=T, min_new_tokens=T, do_sample=sample,
                           top_p=0.9 if sample else None, temperature=1.0 if sample else None, pad_token_id=0)

    def engine(decode_mode: str):
        def run(sample: bool):
            return generate(ours, prompts, max_new_tokens=T, stop_ids=[], pad_id=0,
                            temperature=1.0 if sample else 0.0, top_p=0.9,
                            generator=torch.Generator(device=device).manual_seed(0), decode_mode=decode_mode)
        return run

    impls = [("transformers", run_hf)] + [("rlhf_engine" if m == "eager" else f"rlhf_engine_{m}", engine(m))
                                          for m in modes]
    want = run_hf(False)[:, P:].tolist()
    for name, fn in impls[1:]:
        assert fn(False).responses == want, f"{name}: greedy outputs differ from transformers'"
    rows = []
    for mode, sample in (("greedy", False), ("sample", True)):
        timings, peaks = {}, {}
        for impl, fn in impls:
            with torch.no_grad():
                fn(sample)  # warm-up (and compilation)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    fn(sample)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append((time.perf_counter() - t0) * 1e3)
            timings[impl] = statistics.median(times)
            peaks[impl] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else ""
        for impl, ms in timings.items():
            rows.append(dict(impl=impl, mode=mode, batch=args.batch, new_tokens=T, median_ms=round(ms, 1),
                             tokens_per_s=round(args.batch * T / ms * 1e3, 1),
                             speedup=round(timings["transformers"] / ms, 2), peak_mem_mb=peaks[impl]))
            print(rows[-1], flush=True)
    tag = torch.cuda.get_device_name().replace(" ", "_").lower() if device.type == "cuda" else "cpu"
    write_csv(rows, args.out or RESULTS / f"generate_{tag}.csv")


if __name__ == "__main__":
    main()
