"""Ahead-of-time compilation of every Triton launch for GPUs this machine need not have.

    python -m rlhf_kernels.aot                 # compile every launch for sm_90 and sm_80, check, print
    python -m rlhf_kernels.aot --json out.json # the same, machine-readable (tests/kernels/test_aot_compile.py)
    python -m rlhf_kernels.aot --markdown      # the resource table of docs/kernels.md
    python -m rlhf_kernels.aot --fwd-config 256,256,128,8,5 --arch 80   # check one forward config

Triton's compiler builds PTX and a cubin for a ``GPUTarget`` without a GPU or a driver (ptxas ships
in the wheel). Each launch is planned by the launchers' own ``plan_*`` functions (``launch`` table,
vocabulary-split rule, backward chunking) at two shapes: the benchmark shape N=16384, H=4096,
V=128256 and its tensor-parallel shard at tp=8 (V/8 = 16032 rows a rank). Argument specialisation
follows Triton's JIT: pointers and integers divisible by 16 are marked so, as a launch would mark them.

Checks per compiled kernel (``check``):
- no register spills (ptxas' own report, captured from Triton's compile);
- shared memory per block within the architecture's limit (``launch.ARCHS``);
- 16-bit GEMM kernels use the intended matrix instruction (``wgmma`` on sm_90, ``mma.sync`` on sm_80).

Must run without ``TRITON_INTERPRET=1`` (which turns the kernels into interpreter objects): the tests
run it in a subprocess with that variable removed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from . import launch as L

SHAPES = {"bench": (16384, 4096, 128256), "tp8": (16384, 4096, 128256 // 8)}  # (N, H, V per rank)
ARCH_CAPS = (90, 80)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TL_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
            torch.int8: "i8", torch.int32: "i32"}
GEMM_KERNELS = ("_state_fwd_kernel", "_dlogits_kernel")


@dataclass
class Job:
    """One compile: picklable, so workers can run it (kernels are named, not passed)."""

    kernel: str  # "module:function"
    label: str  # variant, e.g. "fwd policy+ref"
    arch: int
    dtype: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    attrs: dict[int, int]  # argument index -> divisibility
    options: dict[str, int]
    grids: dict[str, list[int]] = field(default_factory=dict)  # shape name -> grid

    def key(self) -> str:
        return json.dumps([self.kernel, self.arch, self.signature, self.constexprs, self.attrs, self.options],
                          sort_keys=True, default=str)


@dataclass
class Report:
    kernel: str
    label: str
    arch: int
    dtype: str
    constexprs: dict[str, object]
    options: dict[str, int]
    grids: dict[str, list[int]]
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    mma: str  # "wgmma", "mma.sync" or "fma"
    error: str = ""


def job_for(plan: L.KernelPlan, label: str, arch: int, dtype: torch.dtype, shape: str) -> Job:
    """Translate a launcher's plan into Triton's signature, constants and JIT specialisation."""
    kernel = plan.kernel
    if not hasattr(kernel, "fn") or type(kernel).__name__ != "JITFunction":
        raise RuntimeError("rlhf_kernels.aot needs compiled kernels: unset TRITON_INTERPRET")
    signature, constexprs, attrs = {}, dict(plan.constexprs), {}
    for i, name in enumerate(kernel.arg_names):
        if name in plan.constexprs:
            signature[name] = "constexpr"
        elif name in plan.pointers:
            signature[name] = "*" + _TL_TYPE[plan.pointers[name]]
            attrs[i] = 16  # torch allocations are 16-byte aligned or better
        else:
            value = plan.scalars[name]
            if isinstance(value, float):
                signature[name] = "fp32"
            elif value == 1:  # the JIT turns an integer 1 into a constant
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[i] = 16
    mod = kernel.fn.__module__
    return Job(f"{mod}:{kernel.fn.__name__}", label, arch, _TL_TYPE[dtype], signature, constexprs, attrs,
               dict(plan.options), {shape: list(plan.grid)})


def plans(arch: int, shape: str, dtype: torch.dtype) -> list[tuple[str, L.KernelPlan]]:
    """Every launch the launchers make for one architecture, shape and operand dtype."""
    from ._gae_triton import gae_plan
    from ._ppo_triton import ppo_plan
    from .triton_lm_head import TritonImpl

    N, H, V = SHAPES[shape]
    impl = TritonImpl(arch=arch, sms=L.ARCHS[L.arch_family(arch)].sms)
    out = []
    for label, pol, ref in (("fwd policy", True, False), ("fwd reference", False, True), ("fwd policy+ref", True, True)):
        out.append((label, impl.plan_forward(N, V, H, dtype, pol, ref, (H, H, H, H), 1.0)))
    n1, v1 = impl.backward_chunks(N, V)
    for label, need_u in (("dlogits", False), ("dlogits +KL", True)):
        out.append((label, impl.plan_dlogits(H, dtype, dtype, 0, n1, 0, v1, need_u, (H, H, H, H, v1), 1.0)))
    if dtype != torch.float32:  # Gemma 2's final logit softcap (30), in the 16-bit dtypes it trains in: the
        # tanh tiles, forward with the reference and backward with KL
        out.append(("fwd policy+ref softcap", impl.plan_forward(N, V, H, dtype, True, True, (H, H, H, H), 1.0,
                                                                softcap=30.0)))
        out.append(("dlogits +KL softcap", impl.plan_dlogits(H, dtype, dtype, 0, n1, 0, v1, True, (H, H, H, H, v1),
                                                             1.0, softcap=30.0)))
    # PPO token loss: every KL mode with the entropy bonus and dual clip, and the bare surrogate; in the
    # 16-bit dtypes the k3 variant (the kernel upcasts on load, so the rest compile alike).
    modes = [(k, True, True) for k in range(5)] + [(0, False, False)] if dtype == torch.float32 else [(3, True, True)]
    for kl_mode, ent, dual in modes:
        out.append((f"ppo kl={kl_mode}{' +ent+dual' if ent else ''}", ppo_plan(N, dtype, kl_mode, ent, dual)))
    if dtype == torch.float32:  # the optional KL and log-ratio clamps (verl / OpenRLHF conventions)
        out.append(("ppo kl=3 +clamps", ppo_plan(N, dtype, 3, True, True, kl_clamp=10.0, lr_clamp=20.0)))
    if dtype == torch.float32:
        out.append(("gae", gae_plan(N // 1024, 1024)))  # 16 rows of 1024 steps
    return out


def all_jobs(archs=ARCH_CAPS, dtypes=DTYPES) -> list[Job]:
    """Every distinct compile over architectures, shapes and dtypes (shapes that compile alike merge)."""
    jobs: dict[str, Job] = {}
    for arch in archs:
        for dtype in dtypes:
            for shape in SHAPES:
                for label, plan in plans(arch, shape, dtype):
                    job = job_for(plan, label, arch, dtype, shape)
                    if job.key() in jobs:
                        jobs[job.key()].grids.update(job.grids)
                    else:
                        jobs[job.key()] = job
    return list(jobs.values())


def _resolve(name: str):
    module, fn = name.split(":")
    return getattr(importlib.import_module(module), fn)


def _ptxas_numbers(log: str, kernel: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ptxas -v output."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas resource report for {kernel}:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_job(job: Job) -> Report:
    """Compile for the job's target; ptxas' -v report is captured from Triton's own invocation."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its report
    knobs.nvidia.dump_ptxas_log = True
    fn = _resolve(job.kernel)
    src = ASTSource(fn=fn, signature=job.signature, constexprs=job.constexprs,
                    attrs={(i,): [["tt.divisibility", d]] for i, d in job.attrs.items()})
    base = dict(kernel=job.kernel.split(":")[1], label=job.label, arch=job.arch, dtype=job.dtype,
                constexprs=job.constexprs, options=job.options, grids=job.grids)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as exc:  # noqa: BLE001 - a compile error is a result to report, not a crash
        return Report(**base, registers=0, spill_stores=0, spill_loads=0, shared_bytes=0, mma="", error=str(exc)[:2000])
    regs, stores, loads = _ptxas_numbers(log.getvalue(), job.kernel)
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "fma"
    return Report(**base, registers=regs, spill_stores=stores, spill_loads=loads,
                  shared_bytes=int(compiled.metadata.shared), mma=mma)


def check(report: Report) -> list[str]:
    """What is wrong with a compiled kernel for its architecture (empty: fit to launch)."""
    spec = L.ARCHS[L.arch_family(report.arch)]
    where = f"{report.kernel} [{report.label}, sm_{report.arch}, {report.dtype}]"
    if report.error:
        return [f"{where}: does not compile: {report.error.splitlines()[0] if report.error else ''}"]
    problems = []
    if report.spill_stores or report.spill_loads:
        problems.append(f"{where}: spills registers ({report.spill_stores} B stored, {report.spill_loads} B loaded)")
    if report.shared_bytes > spec.max_shared_bytes:
        problems.append(f"{where}: needs {report.shared_bytes / 1024:.0f} KiB of shared memory per block, "
                        f"over the {spec.max_shared_bytes // 1024} KiB of {spec.name}")
    if report.kernel in GEMM_KERNELS and report.dtype in ("bf16", "fp16") and report.mma != spec.mma:
        problems.append(f"{where}: the GEMM compiled to {report.mma}, not {spec.mma}")
    return problems


def compile_all(jobs: list[Job], workers: int | None = None) -> list[Report]:
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [compile_job(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_job, jobs))


def markdown(reports: list[Report]) -> str:
    """The resource table: one row per kernel variant, architecture and dtype."""
    head = ("| kernel | variant | arch | dtype | tile (N x V x H) / block | warps | stages | grid bench / tp8 "
            "| registers | spills (B) | shared (KiB) | MMA |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for r in sorted(reports, key=lambda r: (r.kernel, r.label, -r.arch, r.dtype)):
        c = r.constexprs
        tile = (f"{c['BLOCK_N']} x {c['BLOCK_V']} x {c['BLOCK_H']}" if "BLOCK_N" in c
                else str(c.get("BLOCK", c.get("BLOCK_B"))))
        grid = " / ".join("x".join(map(str, r.grids[s])) if s in r.grids else "-" for s in SHAPES)
        rows.append(f"| `{r.kernel}` | {r.label} | sm_{r.arch} | {r.dtype} | {tile} | {r.options.get('num_warps', '')} "
                    f"| {r.options.get('num_stages', '')} | {grid} | {r.registers} | {r.spill_stores + r.spill_loads} "
                    f"| {r.shared_bytes / 1024:.0f} | {r.mma} |")
    return "\n".join([head, *rows])


def _config_job(spec: str, arch: int, kl: bool = False) -> Job:
    """A forward job at the benchmark shape with an explicit config 'block_n,block_v,block_h,warps,stages'
    (``kl``: the two-GEMM forward, policy and reference tiles together)."""
    from .triton_lm_head import TritonImpl

    cfg = L.LaunchConfig(*(int(v) for v in spec.split(",")))
    N, H, V = SHAPES["bench"]
    plan = TritonImpl(config=cfg, arch=arch, sms=L.ARCHS[L.arch_family(arch)].sms).plan_forward(
        N, V, H, torch.bfloat16, True, kl, (H, H, H, H), 1.0)
    return job_for(plan, f"fwd {'policy+ref' if kl else 'policy'} {spec}", arch, torch.bfloat16, "bench")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write every report (and its problems) to this file")
    parser.add_argument("--markdown", action="store_true", help="print the resource table")
    parser.add_argument("--arch", type=int, choices=ARCH_CAPS, action="append", help="default: all")
    parser.add_argument("--fwd-config", help="compile one bf16 forward config 'block_n,block_v,block_h,warps,stages'")
    parser.add_argument("--kl", action="store_true", help="with --fwd-config: the two-GEMM (policy + reference) forward")
    parser.add_argument("--workers", type=int)
    args = parser.parse_args(argv)
    if L.interpreting():
        parser.error("TRITON_INTERPRET=1 is set: ahead-of-time compilation needs the real compiler")
    archs = tuple(args.arch or ARCH_CAPS)
    jobs = [_config_job(args.fwd_config, a, args.kl) for a in archs] if args.fwd_config else all_jobs(archs)
    reports = compile_all(jobs, args.workers)
    problems = [p for r in reports for p in check(r)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": __import__("triton").__version__,
                       "reports": [asdict(r) for r in reports], "problems": problems}, f, indent=1)
    print(markdown(reports) if args.markdown else f"{len(reports)} kernels compiled, {len(problems)} problems")
    for p in problems:
        print("PROBLEM", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
