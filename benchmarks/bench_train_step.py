"""Benchmark: one training step of a ~1B Llama-shaped model, fused LM-head kernels against eager logits.

    python benchmarks/bench_train_step.py            # one GPU: Llama-3.2-1B shape, bf16, 4 x 2048 tokens
    python benchmarks/bench_train_step.py --tiny     # CPU smoke run of the same script

Two steps, each run both ways on the same weights and batch:
- ``sft``: next-token loss -mean(logp) of the policy.
- ``ppo``: the PPO clipped surrogate with an exact-KL penalty against a frozen reference model and an
  entropy bonus (``rlhf_kernels.ppo_policy_loss``), old log-probs from the same weights.
``fused``: the model returns per-token log-probs, entropy and KL through ``rlhf_kernels.linear_logprob``
(Triton on a GPU), never building [tokens, vocab] logits. ``eager``: logits = hidden @ W^T, then
log_softmax in fp32, gather, entropy and KL over the materialized distribution. The step includes
forward, backward and an AdamW update; time is the median after warm-up, memory the peak above the
weights and optimizer state. Writes benchmarks/results/train_step_<device>.csv.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _bench import PeakMemory, write_csv

from rlhf_engine.models.transformer import Transformer, TransformerConfig
from rlhf_kernels import linear_logprob, ppo_policy_loss


def eager_outputs(hidden, weight, targets, ref_hidden=None, ref_weight=None):
    """(logp, entropy, kl) from materialized fp32 log-softmax over the whole vocabulary."""
    logq = None
    logits = (hidden @ weight.T).float()  # (B, S, V)
    logp_all = torch.log_softmax(logits, dim=-1)
    p = logp_all.exp()
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    entropy = -(p * logp_all).sum(-1)
    kl = None
    if ref_hidden is not None:
        logq = torch.log_softmax((ref_hidden @ ref_weight.T).float(), dim=-1)
        kl = (p * (logp_all - logq)).sum(-1)
    return logp, entropy, kl


def step_fn(kind: str, path: str, model: Transformer, ref: Transformer, x: torch.Tensor):
    inputs, targets = x[:, :-1], x[:, 1:]
    mask = torch.ones_like(targets, dtype=torch.bool)

    def run():
        hidden = model(inputs)
        if kind == "sft":
            if path == "fused":
                logp = linear_logprob(hidden, model.output_weight, targets).logp
            else:
                logp = eager_outputs(hidden, model.output_weight, targets)[0]
            return -logp.mean()
        with torch.no_grad():
            ref_hidden = ref(inputs)
        if path == "fused":
            out = linear_logprob(hidden, model.output_weight, targets, ref_hidden=ref_hidden,
                                 ref_weight=ref.output_weight)
            logp, entropy, kl = out.logp, out.entropy, out.kl
        else:
            logp, entropy, kl = eager_outputs(hidden, model.output_weight, targets, ref_hidden, ref.output_weight)
        adv = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1)).to(logp.device)
        return ppo_policy_loss(logp, logp.detach(), adv, mask, kl=kl, kl_estimator="exact", kl_coef=0.05,
                               entropy=entropy, entropy_coef=0.01).loss

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small model (CPU smoke run)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("the full benchmark needs a CUDA GPU; use --tiny for a CPU smoke run")
    if args.tiny:
        cfg = TransformerConfig(vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                                num_kv_heads=2, max_position_embeddings=256)
        batch, seq, dtype = 2, 128, torch.float32
    else:  # Llama-3.2-1B: 1.24B parameters, tied embeddings, a 128256-token vocabulary
        cfg = TransformerConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                                num_heads=32, num_kv_heads=8, max_position_embeddings=4096, tie_word_embeddings=True,
                                rope_theta=500000.0)
        batch, seq, dtype = 4, 2048, torch.bfloat16
    batch, seq = args.batch or batch, args.seq or seq
    with torch.device(device):  # built and initialised where they run (1.2B CPU initialisations take minutes)
        base = Transformer(cfg)
    base.reset_parameters(torch.Generator(device).manual_seed(0))
    with torch.device(device):
        ref = Transformer(cfg).to(dtype=dtype)
    ref.load_state_dict(base.state_dict())
    ref.requires_grad_(False)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for kind in ("sft", "ppo"):
        for path in ("eager", "fused"):
            with torch.device(device):
                model = Transformer(cfg).to(dtype=dtype)
            model.load_state_dict(base.state_dict())
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), foreach=True)
            run = step_fn(kind, path, model, ref, x)
            times, losses = [], []
            for i in range(args.steps):
                if i == 2:  # optimizer state exists from here on: measure the step's own peak above it
                    mem = PeakMemory(device).__enter__()
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                loss = run()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                losses.append(float(loss.detach()))
            mem.__exit__(None, None, None)
            rows.append({"step": kind, "path": path, "dtype": str(dtype).removeprefix("torch."),
                         "params_m": round(sum(q.numel() for q in model.parameters()) / 1e6, 1),
                         "tokens": batch * seq, "step_ms": round(1e3 * statistics.median(times[2:]), 2),
                         "peak_mem_mb": round(mem.peak, 1), "first_loss": round(losses[0], 5)})
            print(rows[-1], flush=True)
            del model, opt
    for kind in ("sft", "ppo"):
        eager, fused = (r for r in rows if r["step"] == kind)
        print(f"{kind}: fused {eager['step_ms'] / fused['step_ms']:.2f}x eager step speed, "
              f"{fused['peak_mem_mb'] / max(eager['peak_mem_mb'], 1e-9):.2f}x its peak memory, "
              f"first-step loss {fused['first_loss']} vs {eager['first_loss']}")
    name = torch.cuda.get_device_name().replace(" ", "_").lower() if device == "cuda" else "cpu"
    write_csv(rows, Path(__file__).parent / "results" / f"train_step_{name}{'_tiny' if args.tiny else ''}.csv")


if __name__ == "__main__":
    main()
