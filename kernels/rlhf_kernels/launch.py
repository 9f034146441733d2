"""Launch configurations for the Triton kernels: one small table keyed by GPU architecture.

Every launcher asks this module, never a default, for its tile sizes, warps and pipeline stages, so the
configuration that runs on a GPU is the one the ahead-of-time tests compile (``rlhf_kernels.aot``):

    cfg = lm_head_config(arch=90, kernel="fwd", gemms=1, dtype=torch.bfloat16)
    splits = vocab_splits(n_tokens, vocab, cfg, sms=132)

Architectures. ``arch_family`` maps a compute capability to a row of the table:
- ``sm90`` (Hopper: H100, H200; also newer parts, which run sm_90 code paths in Triton): 132 SMs,
  227 KiB of shared memory per block, warp-group MMA (``wgmma``), 64 K registers per SM.
- ``sm80`` (Ampere and Ada: A100, A10, L4, L40, RTX 30/40): 108 SMs on an A100, ``mma.sync``. The
  A100 allows 163 KiB per block, but sm_86/sm_89 parts allow only 99 KiB, so every sm80 entry is kept
  under 99 KiB and serves the whole family.
- Anything older than sm_80 has no bf16 tensor cores: ``linear_logprob(backend="auto")`` uses the
  chunked torch path there.

Rules behind the entries (checked for every entry by ``tests/kernels/test_aot_compile.py``: compiles for
its architecture, spills no registers, fits the shared-memory limit, uses the intended MMA):
- 16-bit operands (bf16, fp16), one GEMM per tile (policy-only or reference-only forward; backward
  without the KL term): a 128 x 128 fp32 accumulator over 8 warps (64 registers a thread), K step 64 on
  Hopper (4 stages, 128 KiB) and 32 on Ampere (4 stages, 48 KiB). The online-softmax epilogue holds one
  more tile of temporaries, which is what 8 warps leave room for.
- Two GEMMs per tile (policy and reference logits live at once for the exact KL): halve the vocabulary
  tile to 64, so the two accumulators take the registers one took. 128 x 128 with two tiles spills.
- fp32 operands run ``input_precision="ieee"`` (FMA, bit-comparable with a torch fp32 matmul, no
  TF32): 64 x 64 x 32 tiles, 2 stages, over 8 warps in the forward (over 4 the two-GEMM forward
  spills) and 4 in the backward (over 8, ptxas caps the one-GEMM backward at 80 registers and spills).
  fp32 is the oracle's dtype; production runs bf16.
- Elementwise kernels (PPO token loss, GAE scan) are memory-bound: 1024 tokens a program with 4 warps;
  64 rows a program for the GAE scan.

Vocabulary splits (grid axis 1 of the forward): the forward sweeps the vocabulary inside a program, so
with few token blocks the GPU would idle. ``vocab_splits`` picks the number of slices s (merged on the
host like tensor-parallel shards) that maximises wave efficiency, n_programs / (waves * SMs), over
1..``MAX_SPLITS`` and takes the smallest s within 2% of the best, never slicing below 8 vocabulary
tiles a program.

Under ``TRITON_INTERPRET=1`` (CPU tests) the table's ``interpret`` row gives tiny tiles: the interpreter
runs every lane in Python.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch


@dataclass(frozen=True)
class ArchSpec:
    """One GPU architecture family: what the launch table and the resource checks need."""

    name: str
    capability: int  # the compute capability compiled for, e.g. 90 for sm_90
    sms: int  # streaming multiprocessors of the reference part (H100 SXM, A100)
    max_shared_bytes: int  # opt-in shared memory per block the family guarantees
    mma: str  # the matrix instruction the 16-bit GEMMs must use, as it appears in PTX


ARCHS: dict[str, ArchSpec] = {
    "sm90": ArchSpec("sm90", 90, 132, 227 * 1024, "wgmma"),
    # 163 KiB on an A100; 99 KiB on sm_86 / sm_89, the bound every sm80 entry keeps.
    "sm80": ArchSpec("sm80", 80, 108, 99 * 1024, "mma.sync"),
}
# The per-block limit of the A100 itself, used when reporting against sm_80 alone.
A100_SHARED_BYTES = 163 * 1024


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and scheduling of one Triton launch."""

    block_n: int  # tokens per program
    block_v: int  # vocabulary rows per tile
    block_h: int  # hidden-dimension step of the GEMM (K)
    num_warps: int
    num_stages: int

    def options(self) -> dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


Kernel = Literal["fwd", "dlogits"]
DtypeClass = Literal["16bit", "fp32"]

# (family, kernel, gemms per tile, dtype class) -> config. gemms: 1 = one logit tile (policy-only or
# reference-only forward, backward without KL), 2 = policy and reference tiles together.
LM_HEAD: dict[tuple[str, Kernel, int, DtypeClass], LaunchConfig] = {
    ("sm90", "fwd", 1, "16bit"): LaunchConfig(128, 128, 64, 8, 4),
    ("sm90", "fwd", 2, "16bit"): LaunchConfig(128, 64, 64, 8, 3),
    ("sm90", "dlogits", 1, "16bit"): LaunchConfig(128, 128, 64, 8, 4),
    ("sm90", "dlogits", 2, "16bit"): LaunchConfig(128, 64, 64, 8, 3),
    ("sm90", "fwd", 1, "fp32"): LaunchConfig(64, 64, 32, 8, 2),
    ("sm90", "fwd", 2, "fp32"): LaunchConfig(64, 64, 32, 8, 2),
    ("sm90", "dlogits", 1, "fp32"): LaunchConfig(64, 64, 32, 4, 2),
    ("sm90", "dlogits", 2, "fp32"): LaunchConfig(64, 64, 32, 4, 2),
    ("sm80", "fwd", 1, "16bit"): LaunchConfig(128, 128, 32, 8, 4),
    ("sm80", "fwd", 2, "16bit"): LaunchConfig(128, 64, 32, 8, 3),
    ("sm80", "dlogits", 1, "16bit"): LaunchConfig(128, 128, 32, 8, 4),
    ("sm80", "dlogits", 2, "16bit"): LaunchConfig(128, 64, 32, 8, 3),
    ("sm80", "fwd", 1, "fp32"): LaunchConfig(64, 64, 32, 8, 2),
    ("sm80", "fwd", 2, "fp32"): LaunchConfig(64, 64, 32, 8, 2),
    ("sm80", "dlogits", 1, "fp32"): LaunchConfig(64, 64, 32, 4, 2),
    ("sm80", "dlogits", 2, "fp32"): LaunchConfig(64, 64, 32, 4, 2),
}
INTERPRET = LaunchConfig(16, 32, 16, 4, 1)  # tiny tiles: the CPU interpreter runs each lane in Python

# Elementwise kernels: tokens (PPO) or rows (GAE) per program, and warps.
PPO_BLOCK, PPO_WARPS = 1024, 4
GAE_BLOCK_B, GAE_WARPS = 64, 4
PPO_BLOCK_INTERPRET, GAE_BLOCK_B_INTERPRET = 256, 16

MAX_SPLITS = 32
MIN_TILES_PER_SPLIT = 8


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def arch_family(capability: int) -> str:
    """Compute capability (major * 10 + minor, e.g. 90, 86) -> a key of ``ARCHS``."""
    if capability >= 90:
        return "sm90"
    if capability >= 80:
        return "sm80"
    raise ValueError(f"no Triton launch table for sm_{capability}: bf16 tensor cores need sm_80 or newer; "
                     "use backend='chunked'")


def device_capability(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def dtype_class(dtype: torch.dtype) -> DtypeClass:
    if dtype in (torch.bfloat16, torch.float16):
        return "16bit"
    if dtype == torch.float32:
        return "fp32"
    raise TypeError(f"the LM-head kernels take bf16, fp16 or fp32 operands, not {dtype}")


def lm_head_config(arch: int | None, kernel: Kernel, gemms: int, dtype: torch.dtype) -> LaunchConfig:
    """The table's entry for compute capability ``arch`` (None: the interpreter's tiny tiles)."""
    if arch is None:
        return INTERPRET
    return LM_HEAD[(arch_family(arch), kernel, gemms, dtype_class(dtype))]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def vocab_splits(n_tokens: int, vocab: int, cfg: LaunchConfig, sms: int) -> int:
    """Vocabulary slices for the forward grid (see the module docstring for the rule)."""
    n_blocks = cdiv(n_tokens, cfg.block_n)
    most = max(1, min(MAX_SPLITS, cdiv(vocab, MIN_TILES_PER_SPLIT * cfg.block_v)))

    def efficiency(s: int) -> float:
        programs = n_blocks * s
        return programs / (cdiv(programs, sms) * sms)

    best = max(efficiency(s) for s in range(1, most + 1))
    return next(s for s in range(1, most + 1) if efficiency(s) >= best - 0.02)


@dataclass(frozen=True)
class KernelPlan:
    """One launch, fully decided: what ``TritonImpl`` runs and what ``rlhf_kernels.aot`` compiles."""

    kernel: Any  # the @triton.jit function
    grid: tuple[int, ...]
    pointers: dict[str, torch.dtype]  # pointer arguments -> element dtype
    scalars: dict[str, int | float]  # scalar arguments -> value
    constexprs: dict[str, Any]
    options: dict[str, int]  # num_warps, num_stages ({} under the interpreter)

    def run(self, tensors: dict[str, torch.Tensor]) -> None:
        args = [tensors[n] if n in self.pointers else self.scalars[n]
                for n in self.kernel.arg_names if n not in self.constexprs]
        self.kernel[self.grid](*args, **self.constexprs, **self.options)


def launch_options(cfg: LaunchConfig) -> dict[str, int]:
    """num_warps / num_stages for a GPU launch; none under the interpreter (it ignores them)."""
    return {} if interpreting() else cfg.options()
