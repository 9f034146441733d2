"""Benchmark: one-step off-policy GRPO (sampling rollout t+1 while training on rollout t) against
on-policy GRPO, side by side in one run, on the same tiny model and reward.

    python benchmarks/bench_off_policy.py [--steps 20] [--max-new-tokens 48] [--layers 4] [--hidden 128]
                                          [--decode-mode compiled]
    OMP_NUM_THREADS=1 python benchmarks/bench_off_policy.py     # one intra-op thread for each side

Variants: ``on_policy`` (algorithm.rl.off_policy_steps=0, one step per rollout); ``off_policy_thread`` and
``off_policy_process`` (off_policy_steps=1, is_correction=tis, sampling in a background thread or in a
sampler process with ``--sampler-threads`` intra-op threads, taken from the trainer's). Each variant runs
in a process of its own (the CPU peak memory is a process's lifetime maximum). Measured from each run's
own metrics, over the steps after the first: the median wall time of a step (rollout included), the
median generation time and time the trainer waited for it, the peak memory of the trainer and of the
sampler process, and the held-out reward before and after. Writes benchmarks/results/off_policy_<device>.csv.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from _bench import write_csv

from rlhf_engine.config import load_config
from rlhf_engine.rewards import REWARD_FUNCTIONS
from rlhf_engine.stages.rl import run_rl

RESULTS = Path(__file__).resolve().parent / "results"


def low_ids(sample) -> float:
    """The fraction of response tokens with an id below a quarter of the vocabulary."""
    return sum(t < 128 for t in sample.response_ids) / max(len(sample.response_ids), 1)


low_ids.on_samples = True


VARIANTS = {
    "on_policy": [],
    "off_policy_thread": ["algorithm.rl.off_policy_steps=1", "algorithm.rl.is_correction=tis"],
    "off_policy_process": ["algorithm.rl.off_policy_steps=1", "algorithm.rl.is_correction=tis",
                           "algorithm.rl.off_policy_sampler=process"],
}


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    """One variant's run and its row (in a process of its own: the CPU peak memory is the process's)."""
    if "bench_low_ids" not in REWARD_FUNCTIONS:
        REWARD_FUNCTIONS.register("bench_low_ids")(low_ids)
    recipe = {
        "model": {"architecture": {"vocab_size": 512, "hidden_size": args.hidden, "intermediate_size": 2 * args.hidden,
                                   "num_layers": args.layers, "num_heads": 4, "max_position_embeddings": 256}},
        "data": {"seq_len": 64 + args.max_new_tokens, "builtin_rows": 200, "eval_fraction": 0.1},
        "optim": {"lr": 3.0e-3, "schedule": "constant"},
        "algorithm": {"name": "grpo", "rl": {"prompts_per_rollout": 8, "group": 4, "kl_coef": 0.01}},
        "rollout": {"max_new_tokens": args.max_new_tokens},
        "reward": {"functions": {"bench_low_ids": 1.0}},
        "trainer": {"max_steps": args.steps, "micro_batch_size": 8, "grad_accum_steps": 4, "eval_every": 0},
        "logging": {"log_every": 1, "progress_bar": False, "tensorboard": False},
    }
    extra = [*VARIANTS[variant], f"algorithm.rl.off_policy_sampler_threads={args.sampler_threads}",
             f"rollout.decode_mode={args.decode_mode}"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        out = Path(tmp) / variant
        s = run_rl(load_config(path, [f"trainer.out_dir={out}", *extra]))
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    times = [b["time_s"] - a["time_s"] for a, b in zip(steps, steps[1:])]
    waits = [r["rollout/generation_wait_s"] for r in steps[1:] if "rollout/generation_wait_s" in r]
    sampler_mem = [r["rollout/sampler_peak_mem_mb"] for r in steps if "rollout/sampler_peak_mem_mb" in r]
    return dict(variant=variant, device="cuda" if torch.cuda.is_available() else "cpu", steps=args.steps,
                step_ms=round(1e3 * statistics.median(times), 1),
                generation_ms=round(1e3 * statistics.median(r["rollout/generation_s"] for r in steps[1:]), 1),
                wait_ms=round(1e3 * statistics.median(waits), 1) if waits else "",
                trainer_peak_mem_mb=max(r.get("peak_mem_mb", 0.0) for r in steps),
                sampler_peak_mem_mb=round(max(sampler_mem), 1) if sampler_mem else "",
                reward_initial=round(s["eval_reward_initial"], 3), reward_final=round(s["eval_reward_final"], 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--sampler-threads", type=int, default=1, help="intra-op threads of the sampler process")
    parser.add_argument("--decode-mode", default="eager", help="rollout.decode_mode of every variant")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # one run, its row as JSON
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.variant:
        print("ROW " + json.dumps(run_variant(args, args.variant)), flush=True)
        return
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--max-new-tokens",
               str(args.max_new_tokens), "--layers", str(args.layers), "--hidden", str(args.hidden),
               "--sampler-threads", str(args.sampler_threads), "--decode-mode", args.decode_mode]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append({**json.loads(next(x for x in out.splitlines() if x.startswith("ROW "))[4:]),
                     "decode_mode": args.decode_mode})
        print(rows[-1], flush=True)
    for row in rows[1:]:
        print(f"{row['variant']} step time: {row['step_ms'] / rows[0]['step_ms']:.2f}x on-policy")
    write_csv(rows, args.out or RESULTS / f"off_policy_{rows[0]['device']}.csv")


if __name__ == "__main__":
    main()
