"""Benchmark: bf16 vs FP8 (Transformer Engine, torchao) training step time and loss curves, side by side.

    python benchmarks/bench_fp8.py                 # one H100: a ~1.2B Llama-shaped model, 200 steps each
    python benchmarks/bench_fp8.py --compile       # every variant with its decoder layers compiled, as the
                                                   # engine runs torchao FP8 on CUDA (parallel.compile_layers)
    python benchmarks/bench_fp8.py --tiny          # a CPU smoke run of the same script (bf16 vs torchao)

Variants: ``bf16``; ``fp8_torchao`` (tensorwise dynamic scaling); ``fp8_te`` (delayed scaling, amax
history 16) when Transformer Engine imports. LM head kept in bf16 (the default exclude). Each variant
starts from the same weights and sees the same random-token batches. step_ms is the median over steps
after 10 warm-up steps; the loss curve of every variant is written too. Goal on an H100: >= 1.3x step
speed-up of the linear-heavy model with the final loss within 1% of bf16.
Writes benchmarks/results/fp8_<gpu>.csv (and fp8_loss_<gpu>.csv; ``_compiled`` before .csv with --compile);
fp8_cpu_tiny.csv for --tiny.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _bench import PeakMemory, write_csv

from rlhf_engine.config import FP8Config
from rlhf_engine.models.transformer import Transformer, TransformerConfig
from rlhf_engine.parallel.compile import compile_decoder_layers
from rlhf_engine.parallel.fp8 import apply_fp8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small model, few steps (CPU smoke run)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer, in every variant (torchao fuses its float8 casts so)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("the full benchmark needs a CUDA GPU (FP8 tensor cores); use --tiny for a CPU smoke run")
    if args.tiny:
        cfg = TransformerConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                                num_kv_heads=2, max_position_embeddings=256)
        batch, seq, steps = 4, 128, min(args.steps, 20)
    else:  # ~1.2B parameters, Llama-shaped
        cfg = TransformerConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=20,
                                num_heads=16, num_kv_heads=16, max_position_embeddings=4096)
        batch, seq, steps = 4, 2048, args.steps
    variants = [("bf16", None), ("fp8_torchao", FP8Config(backend="torchao"))]
    try:
        import transformer_engine  # noqa: F401

        if device == "cuda":
            variants.append(("fp8_te", FP8Config(backend="te")))
    except ImportError:
        print("transformer_engine not installed: no fp8_te row")
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g) for _ in range(16)]
    with torch.device(device):  # built and initialised where they run (1.2B CPU initialisations take minutes)
        base = Transformer(cfg)
    base.reset_parameters(torch.Generator(device).manual_seed(0))
    rows, curves = [], []
    for name, fp8 in variants:
        with torch.device(device):
            model = Transformer(cfg)
        model.load_state_dict(base.state_dict())
        model = apply_fp8(model.to(device=device, dtype=torch.bfloat16), fp8)
        if args.compile:  # what parallel.compile_layers does (on by default for torchao FP8 on CUDA)
            compile_decoder_layers(model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95))
        times, losses = [], []
        with PeakMemory(device) as mem:
            for step in range(steps):
                x = data[step % len(data)].to(device)
                t = time.perf_counter()
                out = model(x[:, :-1], targets=x[:, 1:])
                loss = -out.logp.float().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                losses.append(float(loss))
                if step in (0, 1) or step % 10 == 9:  # progress, so that a run cut short shows where
                    print(f"{name}: step {step + 1}/{steps} loss {losses[-1]:.4f} {1e3 * times[-1]:.0f} ms", flush=True)
                curves.append({"variant": name, "step": step, "loss": round(losses[-1], 5)})
        warm = min(10, steps // 2)
        rows.append({"variant": name, "params_m": round(sum(q.numel() for q in model.parameters()) / 1e6, 1),
                     "tokens_per_step": batch * seq, "step_ms": round(1e3 * statistics.median(times[warm:]), 2),
                     "final_loss": round(statistics.mean(losses[-5:]), 4), "peak_mem_mb": round(mem.peak, 1)})
        print(rows[-1], flush=True)
    for r in rows[1:]:
        print(f"{r['variant']}: {rows[0]['step_ms'] / r['step_ms']:.2f}x bf16 step speed, final loss "
              f"{100 * (r['final_loss'] / rows[0]['final_loss'] - 1):+.2f}% vs bf16")
    out = Path(__file__).parent / "results"
    tag = torch.cuda.get_device_name().replace(" ", "_").lower() if device == "cuda" else device
    write_csv(rows, out / f"fp8_{tag}{'_compiled' if args.compile else ''}{'_tiny' if args.tiny else ''}.csv")
    write_csv(curves, out / f"fp8_loss_{tag}{'_compiled' if args.compile else ''}{'_tiny' if args.tiny else ''}.csv")


if __name__ == "__main__":
    main()
