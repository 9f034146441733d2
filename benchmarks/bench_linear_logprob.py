"""Benchmark: per-token log-probs from hidden states and an LM head, fused vs materialized, side by side.

    python benchmarks/bench_linear_logprob.py                 # CPU: N=4096, H=1024, V=32000, fp32
    python benchmarks/bench_linear_logprob.py --quick         # small shape, seconds
    python benchmarks/bench_linear_logprob.py --device cuda   # GPU: bf16, N=16384, H=4096, V=128256

Providers (each where it runs): eager (logits + log_softmax + gather), trl_selective (logits +
row-by-row logsumexp, TRL's selective log-softmax approach), chunked and triton (rlhf_kernels), liger
(Liger-Kernel fused linear cross entropy) and cce (cut-cross-entropy), plus chunked+kl / triton+kl:
log-prob, entropy and exact KL against a reference model in one call. Passes: fwd, and fwd_bwd with a
random upstream gradient. Time is the median of --repeats runs after a warm-up; peak_mem_mb is the
peak memory above what was allocated before the call (inputs excluded): CUDA allocator peak on GPU,
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) on CPU.

Writes benchmarks/results/linear_logprob_<device>.csv with columns
provider,dtype,n_tokens,hidden,vocab,pass,median_ms,peak_mem_mb.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from _bench import PeakMemory, pin_malloc_threshold, write_csv

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------- providers


def eager(x, w, y, xq=None, wq=None):
    logits = (x @ w.T).float()  # (N, V)
    return torch.log_softmax(logits, dim=-1).gather(1, y[:, None])[:, 0]


def trl_selective(x, w, y, xq=None, wq=None, rows: int = 8):
    """Materialized logits, then log p = z_y - logsumexp(z) computed a slice of rows at a time (TRL's
    selective log-softmax keeps only one row block's softmax temporaries alive)."""
    logits = x @ w.T  # (N, V) in the input dtype
    picked = logits.gather(1, y[:, None])[:, 0].float()
    lse = torch.cat([torch.logsumexp(blk.float(), dim=-1) for blk in logits.split(logits.shape[0] // rows)])
    return picked - lse


def _ours(backend: str, with_kl: bool):
    from rlhf_kernels import linear_logprob

    def run(x, w, y, xq=None, wq=None):
        out = linear_logprob(x, w, y, ref_hidden=xq if with_kl else None, ref_weight=wq if with_kl else None,
                             backend=backend)
        return out.logp + out.entropy + out.kl if with_kl else out.logp

    return run


def _liger():
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    def run(x, w, y, xq=None, wq=None):
        out = LigerFusedLinearCrossEntropyFunction.apply(x, w, y, None, None, -100, 0.0, 0.0, "none")
        return -(out[0] if isinstance(out, tuple) else out)

    return run


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    def run(x, w, y, xq=None, wq=None):
        return -linear_cross_entropy(x, w, y, reduction="none", impl="cce_exact")

    return run


def providers(device: str) -> dict[str, Callable]:
    out: dict[str, Callable] = {"eager": eager, "trl_selective": trl_selective, "chunked": _ours("chunked", False)}
    if device == "cuda":
        out["triton"] = _ours("triton", False)
        for name, make in (("liger", _liger), ("cce", _cce)):
            try:
                out[name] = make()
            except ImportError as exc:
                print(f"skipping {name}: {exc}", file=sys.stderr)
    out["chunked+kl"] = _ours("chunked", True)
    if device == "cuda":
        out["triton+kl"] = _ours("triton", True)
    return out


# ---------------------------------------------------------------------------------------------- measuring


def measure(fn, inputs, grad_out, backward: bool, device: str, repeats: int) -> tuple[float, float]:
    x, w, y, xq, wq = inputs

    def once():
        xg = x.detach().requires_grad_(backward)
        wg = w.detach().requires_grad_(backward)
        out = fn(xg, wg, y, xq, wq)
        if backward:
            out.backward(grad_out)
        return out

    once()  # warm-up (kernel compilation, allocator)
    times, peak = [], 0.0
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = once()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
            del out
        peak = max(peak, mem.peak)
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shape (N=512, H=256, V=8000)")
    parser.add_argument("--n", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--providers", help="comma-separated subset")
    parser.add_argument("--out", type=Path, help="CSV path (default benchmarks/results/linear_logprob_<device>.csv)")
    args = parser.parse_args()

    gpu = args.device == "cuda"
    if not gpu:
        pin_malloc_threshold()
    n, h, v = (16384, 4096, 128256) if gpu else (4096, 1024, 32000)
    if args.quick:
        n, h, v = 512, 256, 8000
    n, h, v = args.n or n, args.hidden or h, args.vocab or v
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    g = torch.Generator(device=args.device).manual_seed(0)
    make = dict(device=args.device, generator=g)
    x = torch.randn(n, h, **make).to(dtype)
    w = (torch.randn(v, h, **make) * h**-0.5).to(dtype)
    xq = torch.randn(n, h, **make).to(dtype)
    wq = (torch.randn(v, h, **make) * h**-0.5).to(dtype)
    y = torch.randint(0, v, (n,), device=args.device, generator=g)
    grad_out = torch.randn(n, device=args.device, generator=g)
    inputs = (x, w, y, xq, wq)

    chosen = providers(args.device)
    if args.providers:
        chosen = {k: f for k, f in chosen.items() if k in args.providers.split(",")}
    device_name = torch.cuda.get_device_name() if gpu else "cpu"
    rows = []
    for name, fn in chosen.items():
        for backward in (False, True):
            ms, mb = measure(fn, inputs, grad_out, backward, args.device, args.repeats)
            row = dict(provider=name, dtype=str(dtype).removeprefix("torch."), n_tokens=n, hidden=h, vocab=v,
                       **{"pass": "fwd_bwd" if backward else "fwd"}, median_ms=round(ms, 2), peak_mem_mb=round(mb, 1))
            rows.append(row)
            print(",".join(str(val) for val in row.values()), flush=True)
    out = args.out or RESULTS / f"linear_logprob_{'cpu' if not gpu else device_name.replace(' ', '_').lower()}.csv"
    write_csv(rows, out)
    print(f"measured on {device_name}")


if __name__ == "__main__":
    main()
