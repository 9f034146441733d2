"""The short table that ends scripts/gpu_check.sh: step outcomes, then the figures its benchmarks wrote.

    python scripts/gpu_summary.py ["1|gpu tests|0|42" ...]   # step|name|exit code|seconds, as gpu_check passes

Reads benchmarks/results/{linear_logprob,linear_logprob_sweep,train_step,fp8,generate}_<device>.csv (fp8:
the compiled run's fp8_<device>_compiled.csv where there is one) for the current CUDA device (or the newest of each when none is visible).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
TARGET_TFLOPS = 800.0  # issue target for linear_logprob fwd+bwd in bf16 on H100/H200


def _device_tag() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name().replace(" ", "_").lower()
    except ImportError:
        pass
    return None


def _rows(prefix: str, tag: str | None) -> list[dict]:
    path = RESULTS / f"{prefix}_{tag}.csv" if tag else None
    if path is None or not path.exists():
        found = sorted((p for p in RESULTS.glob(f"{prefix}_*.csv") if "cpu" not in p.name
                        and (prefix != "linear_logprob" or "sweep" not in p.name)
                        and (prefix != "fp8" or "loss" not in p.name)), key=lambda p: p.stat().st_mtime)
        if not found:
            return []
        path = found[-1]
    with path.open() as f:
        return list(csv.DictReader(f))


def main(argv: list[str]) -> None:
    tag = _device_tag()
    print(f"\n==== gpu_check summary ({tag or 'no CUDA device'}) ====")
    for item in argv:
        step, name, rc, secs = item.split("|")
        print(f"step {step}: {'ok  ' if rc == '0' else f'FAIL (rc {rc})'} {secs:>4}s  {name}")

    rows = _rows("linear_logprob", tag)
    if rows:
        print("\nlinear_logprob (bf16): provider, pass, ms, TFLOP/s, peak MB")
        for r in rows:
            print(f"  {r['provider']:<14} {r['pass']:<8} {float(r['median_ms']):>9.2f} {float(r['tflops']):>7.1f} "
                  f"{float(r['peak_mem_mb']):>10.1f}")
        ours = {r["pass"]: r for r in rows if r["provider"] == "triton"}
        if "fwd_bwd" in ours:
            t = float(ours["fwd_bwd"]["tflops"])
            print(f"  triton fwd+bwd: {t:.0f} TFLOP/s ({'meets' if t >= TARGET_TFLOPS else 'below'} the "
                  f"{TARGET_TFLOPS:.0f} target)")
            for peer in ("liger", "cce"):
                theirs = [r for r in rows if r["provider"] == peer and r["pass"] == "fwd_bwd"]
                if theirs:
                    ratio = float(theirs[0]["median_ms"]) / float(ours["fwd_bwd"]["median_ms"])
                    print(f"  vs {peer}: {ratio:.2f}x its speed (>= 1 means no slower)")
    sweep = _rows("linear_logprob_sweep", tag)
    if sweep:
        for kernel in ("policy", "policy+ref"):
            best = max((r for r in sweep if r["pass"] == "fwd_bwd" and r.get("kernel", "policy") == kernel),
                       key=lambda r: float(r["tflops"]), default=None)
            if best:
                print(f"launch sweep, {kernel}: best fwd+bwd config {best['config']} at {best['tflops']} TFLOP/s")
    steps = _rows("train_step", tag)
    if steps:
        print("\ntrain step (~1B, bf16): step, path, ms, peak MB")
        for r in steps:
            print(f"  {r['step']:<4} {r['path']:<6} {float(r['step_ms']):>9.1f} {float(r['peak_mem_mb']):>10.1f}")
    fp8 = _rows("fp8", f"{tag}_compiled" if tag else None) or _rows("fp8", tag)
    if fp8:
        base = next((r for r in fp8 if r["variant"] == "bf16"), None)
        for r in fp8:
            if base and r is not base:
                print(f"\n{r['variant']}: {float(base['step_ms']) / float(r['step_ms']):.2f}x bf16 step speed, "
                      f"final loss {r['final_loss']} vs {base['final_loss']}")

    gen = _rows("generate", tag)
    if gen:
        print("\ngenerate (tiny Llama, batch 16, 64 tokens): impl, mode, ms, x transformers")
        for r in gen:
            print(f"  {r['impl']:<26} {r['mode']:<7} {float(r['median_ms']):>8.1f} {r['speedup']:>6}x")


if __name__ == "__main__":
    main(sys.argv[1:])
