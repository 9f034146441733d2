"""Benchmark: per-token log-probs from hidden states and an LM head, fused vs materialized, side by side.

    python benchmarks/bench_linear_logprob.py                 # CPU: N=4096, H=1024, V=32000, fp32
    python benchmarks/bench_linear_logprob.py --quick         # small shape, seconds
    python benchmarks/bench_linear_logprob.py --device cuda   # GPU: bf16, N=16384, H=4096, V=128256
    python benchmarks/bench_linear_logprob.py --device cuda --sweep   # + Triton launch-config candidates

Providers (each where it runs): eager (logits + log_softmax + gather), trl_selective (logits +
row-by-row logsumexp, TRL's selective log-softmax approach), chunked and triton (rlhf_kernels), liger
(Liger-Kernel fused linear cross entropy) and cce (cut-cross-entropy), plus chunked+kl / triton+kl:
log-prob, entropy and exact KL against a reference model in one call. Passes: fwd, and fwd_bwd with a
random upstream gradient. Time is the median of --repeats runs after a warm-up; peak_mem_mb is the
peak memory above what was allocated before the call (inputs excluded): CUDA allocator peak on GPU,
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) on CPU.

TFLOP/s counts model FLOPs, not the work a provider chooses to redo: forward 2NHV per LM head read
(the policy's, plus the reference's for the +kl providers), backward 4NHV (dX and dW of the policy).
A recomputing backward does 6NHV, so its hardware rate is higher than the one quoted.

Writes benchmarks/results/linear_logprob_<device>.csv with columns
provider,dtype,n_tokens,hidden,vocab,pass,median_ms,tflops,peak_mem_mb.
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


def _ours(backend, with_kl: bool):
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
    from cut_cross_entropy.linear_cross_entropy import LinearCrossEntropyImpl

    # the exact gradient: "cce_exact" where the release has it, else "cce" with gradient filtering off
    # (25.1.x has only cce and torch_compile; its filter_eps skips small softmax entries in the backward)
    exact = dict(impl="cce_exact") if "CCE_EXACT" in LinearCrossEntropyImpl.__members__ else dict(impl="cce",
                                                                                               filter_eps=None)

    def run(x, w, y, xq=None, wq=None):
        return -linear_cross_entropy(x, w, y, reduction="none", **exact)

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


def model_flops(n: int, h: int, v: int, backward: bool, with_kl: bool) -> float:
    """Forward 2NHV per LM head read (policy, and reference with KL); backward 4NHV for the policy."""
    return 2.0 * n * h * v * (2 if with_kl else 1) + (4.0 * n * h * v if backward else 0.0)


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


# Launch configurations (block_n, block_v, block_h, warps, stages) timed by --sweep beside the table's own
# choice (rlhf_kernels.launch): the data for revising the table. SWEEP: the policy-only (one-GEMM) kernels;
# SWEEP_KL: with the reference (two GEMMs a tile, the exact-KL path). On an H200 the table's two-GEMM
# 128 x 64 tile ran at 215 TFLOP/s and a one-GEMM 64 x 128 tile at 1.5x a one-GEMM 128 x 64 one, so the
# 64 x 128 two-GEMM tiles (no spills on sm_90, `python -m rlhf_kernels.aot --kl --fwd-config ...`) are
# the candidates to measure.
SWEEP = {
    "sm90": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (64, 128, 64, 4, 4),
             (128, 64, 64, 4, 4), (128, 128, 64, 4, 4)],
    "sm80": [(128, 128, 32, 8, 3), (128, 128, 32, 8, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)],
}
SWEEP_KL = {
    "sm90": [(128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 128, 64, 8, 4), (64, 64, 64, 4, 3),
             (128, 128, 64, 8, 3)],
    "sm80": [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3)],
}


def sweep(inputs, grad_out, repeats: int) -> list[dict]:
    from rlhf_kernels import launch as L
    from rlhf_kernels.triton_lm_head import TritonImpl

    family = L.arch_family(L.device_capability(torch.device("cuda")))
    x, w = inputs[0], inputs[1]
    n, h, v = x.shape[0], x.shape[1], w.shape[0]
    rows = []
    for with_kl, specs in ((False, SWEEP[family]), (True, SWEEP_KL[family])):
        for spec in specs:
            fn = _ours(TritonImpl(config=L.LaunchConfig(*spec)), with_kl)
            for backward in (False, True):
                try:
                    ms, mb = measure(fn, inputs, grad_out, backward, "cuda", repeats)
                except Exception as exc:  # noqa: BLE001 - an unlaunchable candidate is a row, not a crash
                    print(f"config {spec}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    continue
                flops = model_flops(n, h, v, backward, with_kl=with_kl)
                rows.append(dict(family=family, kernel="policy+ref" if with_kl else "policy",
                                 config="x".join(map(str, spec)), **{"pass": "fwd_bwd" if backward else "fwd"},
                                 median_ms=round(ms, 2), tflops=round(flops / (ms * 1e-3) / 1e12, 1),
                                 peak_mem_mb=round(mb, 1)))
                print(",".join(str(val) for val in rows[-1].values()), flush=True)
    return rows


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
    parser.add_argument("--sweep", action="store_true", help="GPU: also time Triton launch-config candidates")
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
            try:
                ms, mb = measure(fn, inputs, grad_out, backward, args.device, args.repeats)
            except Exception as exc:  # noqa: BLE001 - a peer's failing release is reported, the others still run
                print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                break
            flops = model_flops(n, h, v, backward, with_kl=name.endswith("+kl"))
            row = dict(provider=name, dtype=str(dtype).removeprefix("torch."), n_tokens=n, hidden=h, vocab=v,
                       **{"pass": "fwd_bwd" if backward else "fwd"}, median_ms=round(ms, 2),
                       tflops=round(flops / (ms * 1e-3) / 1e12, 1), peak_mem_mb=round(mb, 1))
            rows.append(row)
            print(",".join(str(val) for val in row.values()), flush=True)
    tag = "cpu" if not gpu else device_name.replace(" ", "_").lower()
    out = args.out or RESULTS / f"linear_logprob_{tag}.csv"
    write_csv(rows, out)
    if args.sweep and gpu:
        write_csv(sweep(inputs, grad_out, args.repeats), RESULTS / f"linear_logprob_sweep_{tag}.csv")
    print(f"measured on {device_name}")


if __name__ == "__main__":
    main()
