"""Benchmark: one GRPO step of rlhf-engine vs TRL's GRPOTrainer on the same tiny HF model, side by side.

    python benchmarks/bench_rl_step.py [--prompts 8] [--group 4] [--max-new-tokens 32] [--steps 5]

A step is a whole GRPO iteration: sample ``group`` responses to each of ``prompts`` prompts, score them
(the fraction of response tokens equal to a target token), the reference pass for the KL, then the
policy forward, backward and AdamW step. Both sides: the same random LlamaForCausalLM checkpoint and
tokenizer (plain-text prompts, no chat template), temperature 1, no top-k/top-p, beta = 0.04 with the k3
KL in the loss, clip 0.2, per-sequence token-mean loss ("grpo"), group-normalised advantages, one update
per generation, fp32 (``--dtype bfloat16``: TRL's default bf16 autocast over fp32 weights against
``precision.dtype=bfloat16``, bf16 weights with fp32 masters), constant LR, clip-norm 1.0, the same number of torch threads. TRL's overridden
defaults are listed in ``_trl_grpo.py``.

Rows: ``trl`` (GRPOTrainer; policy and a separate reference model), ``rlhf_engine`` (trunk_layers = 0:
the whole policy trains, the reference is a whole copy, as in TRL), ``rlhf_engine_compiled_decode`` (the
same with ``rollout.decode_mode=compiled``; compilation happens in the warm-up step), ``trl_torch_compile``
(TRL with the Trainer's ``torch_compile=True``), ``rlhf_engine_compiled`` (compiled decoding and
``parallel.compile_layers=true``: each decoder layer through torch.compile for the training and reference
passes) and ``rlhf_engine_shared_trunk`` (the lower half of the layers frozen and shared by policy and
reference). Each framework runs in fresh
subprocesses (one timed, one for memory); step_s is the median over ``--steps`` timed steps after one warm-up; tokens_per_s counts
generated completion tokens (EOS included, padding not); peak_mem_mb is the resident-set high-water mark
above the level before the timed steps (VmHWM reset through /proc/self/clear_refs), or the CUDA peak.
Writes benchmarks/results/rl_step_<device>.csv (rl_step_<device>_bf16.csv with ``--dtype bfloat16``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = ["kalo mine tu", "ra si po de", "ba zu fe", "gi ho ja we ka", "tu ne mi", "po de ba zu", "fe gi ho",
           "ja we ka lo", "mine ra si", "de ba tu ne", "zu fe gi ho", "ka lo mi ne", "si po de", "ho ja we",
           "ne tu ra si", "we ka lo mi"]


def ours(model_dir: str, prompts: list[str], *, group: int, max_new_tokens: int, steps: int, beta: float, lr: float,
         seed: int, target_token: int, trunk_layers: int, threads: int, decode_mode: str = "eager",
         bf16: bool = False, compile_layers: bool = False) -> dict:
    """rlhf-engine's GRPO step through the library: ExperienceStream (generate, reward, reference pass,
    advantages) and the trainer's train_step with the RL objective."""
    import torch
    from _bench import PeakMemory

    from rlhf_engine.algorithms.rl import resolve, rl_objective
    from rlhf_engine.config import validate
    from rlhf_engine.data.prompts import PromptRow, prompt_item
    from rlhf_engine.models import load_hf_model, load_tokenizer
    from rlhf_engine.models.roles import Role, RoleModel
    from rlhf_engine.parallel.runtime import init_runtime
    from rlhf_engine.rewards import REWARD_FUNCTIONS, CombinedReward
    from rlhf_engine.rollout.experience import ExperienceMaker
    from rlhf_engine.rollout.stream import ExperienceStream
    from rlhf_engine.trainer import build_optimizer, build_scheduler, train_step

    torch.set_num_threads(threads)

    def target_fraction(sample) -> float:
        return sum(t == target_token for t in sample.response_ids) / max(len(sample.response_ids), 1)

    target_fraction.on_samples = True
    REWARD_FUNCTIONS.register("target_fraction")(target_fraction)
    n = len(prompts) * group
    cfg = validate({
        "model": {"hf_path": model_dir, "trunk_layers": trunk_layers},
        "precision": {"dtype": "bfloat16" if bf16 else "float32"},
        "parallel": {"compile_layers": compile_layers},
        "data": {"seq_len": 64 + max_new_tokens},
        "optim": {"lr": lr, "schedule": "constant", "betas": [0.9, 0.999], "grad_clip": 1.0},
        "algorithm": {"name": "grpo", "rl": {"prompts_per_rollout": len(prompts), "group": group, "kl_coef": beta,
                                             "clip_eps": 0.2}},
        "rollout": {"max_new_tokens": max_new_tokens, "temperature": 1.0, "decode_mode": decode_mode},
        "reward": {"functions": {"target_fraction": 1.0}},
        "trainer": {"max_steps": steps + 1, "micro_batch_size": n, "seed": seed},
    })
    rt = init_runtime(cfg)
    tok = load_tokenizer(model_dir)
    roles = RoleModel.from_sft(load_hf_model(model_dir), trunk_layers, roles=(Role.POLICY, Role.REFERENCE))
    model = rt.parallelize(roles, cfg)
    settings = resolve("grpo", cfg.algorithm.rl, max_new_tokens=max_new_tokens)
    reward = CombinedReward(cfg.reward, seq_len=cfg.data.seq_len, pad_id=tok.pad_token_id)
    maker = ExperienceMaker(model, tok, reward, settings, cfg.rollout, pad_id=tok.pad_token_id, on_policy=True)
    stream = ExperienceStream(maker, [prompt_item(tok, PromptRow(p)) for p in prompts], settings, cfg, rt)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)
    objective = rl_objective(settings)
    times, tokens, rewards = [], [], []
    mem = PeakMemory(rt.device.type)
    for step in range(steps + 1):
        if step == 1:
            mem.__enter__()
        t0 = time.perf_counter()
        batch = stream.next_step()
        train_step(model, optimizer, scheduler, batch.micro_batches, objective, cfg.optim.grad_clip,
                   totals=batch.totals)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if step >= 1:
            times.append(elapsed)
            tokens.append(int(stream.buffer.mask.sum()))
            rewards.append(float(stream.buffer.scores.mean()))
    mem.__exit__(None, None, None)
    step_s = statistics.median(times)
    completion = statistics.mean(tokens)
    return {"step_s": step_s, "completion_tokens": completion, "tokens_per_s": completion / step_s,
            "peak_mem_mb": mem.peak, "rewards": rewards}


def worker(args) -> None:
    sys.path.insert(0, str(HERE))
    common = dict(group=args.group, max_new_tokens=args.max_new_tokens, steps=args.steps, beta=0.04, lr=1e-5,
                  seed=0, target_token=args.target_token, bf16=args.dtype == "bfloat16")
    prompts = PROMPTS[: args.prompts]
    if args.worker == "trl":
        from _trl_grpo import trl_grpo_steps

        with tempfile.TemporaryDirectory() as work:
            out = trl_grpo_steps(args.model_dir, prompts, work_dir=work, threads=args.threads,
                                 torch_compile=args.compile, **common)
    else:
        out = ours(args.model_dir, prompts, trunk_layers=args.trunk_layers, threads=args.threads,
                   decode_mode=args.decode_mode, compile_layers=args.compile, **common)
    print("RESULT " + json.dumps(out))


def _run(name: str, cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16: TRL's default bf16 autocast against precision.dtype=bfloat16 (fp32 master weights)")
    p.add_argument("--worker", choices=["trl", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--target-token", type=int, help=argparse.SUPPRESS)
    p.add_argument("--trunk-layers", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--decode-mode", default="eager", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(HERE))
    import torch
    from _bench import write_csv
    from _trl_grpo import build_tiny_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "tiny-llama")
        info = build_tiny_model(model_dir, seed=0, hidden=args.hidden, intermediate=int(args.hidden * 8 / 3) // 8 * 8,
                                layers=args.layers, heads=4, kv_heads=2)
        from transformers import AutoTokenizer

        target = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("ka")
        # (row, worker, trunk layers, decode mode, compiled: TRL's torch_compile=True / our parallel.compile_layers)
        variants = [("trl", "trl", 0, "eager", False), ("rlhf_engine", "ours", 0, "eager", False),
                    ("rlhf_engine_compiled_decode", "ours", 0, "compiled", False),
                    ("trl_torch_compile", "trl", 0, "eager", True),
                    ("rlhf_engine_compiled", "ours", 0, "compiled", True),
                    ("rlhf_engine_shared_trunk", "ours", args.layers // 2, "eager", False)]
        path = os.pathsep.join([str(HERE.parent), str(HERE.parent / "kernels"), os.environ.get("PYTHONPATH", "")])
        for name, worker_kind, k, decode_mode, compiled in variants:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker_kind, "--model-dir", model_dir,
                   "--target-token", str(target), "--trunk-layers", str(k), "--prompts", str(args.prompts),
                   "--group", str(args.group), "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads),
                   "--decode-mode", decode_mode, "--dtype", args.dtype] + (["--compile"] if compiled else [])
            # time with the default allocator; memory in a second run with a pinned mmap threshold, so freed
            # temporaries are not silently reused from resident heap pages (see _bench.pin_malloc_threshold)
            timed = _run(name, cmd + ["--steps", str(args.steps)], {**os.environ, "PYTHONPATH": path})
            mem = _run(name, cmd + ["--steps", "2"], {**os.environ, "PYTHONPATH": path, "MALLOC_MMAP_THRESHOLD_": "65536"})
            r = {**timed, "peak_mem_mb": mem["peak_mem_mb"]}
            rows.append({"framework": name, "algorithm": "grpo", "dtype": args.dtype, "prompts": args.prompts,
                         "group": args.group,
                         "max_new_tokens": args.max_new_tokens, "step_s": round(r["step_s"], 4),
                         "tokens_per_s": round(r["tokens_per_s"], 1), "peak_mem_mb": round(r["peak_mem_mb"], 1)})
            print(rows[-1], f"(completion tokens/step {r['completion_tokens']:.0f}, model vocab {info['vocab_size']})",
                  flush=True)
    base = rows[0]
    for r in rows[1:]:
        print(f"{r['framework']}: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x TRL tokens/s, "
              f"peak memory {r['peak_mem_mb']:.0f} vs {base['peak_mem_mb']:.0f} MB")
    write_csv(rows, HERE / "results" / f"rl_step_{device}{'_bf16' if args.dtype == 'bfloat16' else ''}.csv")


if __name__ == "__main__":
    main()
