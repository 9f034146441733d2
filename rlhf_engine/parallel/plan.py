"""Dry run at scale: per-rank memory of an RLHF layout, from the real sharding plans on meta tensors.

    rlhf-engine plan --config configs/gpt3_175b_ppo.yaml --world-size 1024 [--gpu-memory-gb 80] [--json]

Every component (token embedding, one decoder layer, final norm + LM head, final norm + scalar head)
is built on the meta device and sharded with the engine's own tensor-parallel and FSDP2 plans over a
fake process group of ``world_size`` ranks, so the per-rank shard sizes are exact (padding of uneven
FSDP shards included), not estimated. No memory is allocated and nothing communicates.

The roles follow the shared-trunk design: a frozen trunk (embedding + ``model.trunk_layers`` lower
layers) is stored once, and each of policy, reference, critic and reward owns the layers above it and
its head (LM head for policy and reference, a scalar head for critic and reward). With
``trunk_layers = 0`` they are four separate models. Pipeline stages take the cost-balanced split the
engine itself uses (``stage_split.py``: a frozen trunk layer costs one forward, a head layer a forward
per head plus a backward per trainable head): the trunk fills the first stages, with many more layers
each, and the role heads the last. Each stage's FLOPs per step are reported, and a split whose busiest
stage exceeds the mean by more than 20% is warned about.

Bytes per parameter element held by a rank:
- trainable (policy, critic): fp32 master 4 + fp32 gradient 4 + Adam moments 8 (FSDP-sharded);
- frozen (trunk, reference, reward): weights in ``precision.dtype`` (2 in bf16; FSDP-sharded, never a
  gradient or optimizer state);
- FSDP all-gather buffers: two unsharded bf16 decoder layers (the one running and the one prefetched).

Activations (bf16, per rank, for the trainable role with the larger share of the stage; policy and
critic train one after the other), after Korthikanti et al. 2022 with fused attention (no s^2 term):
per layer and microbatch s*b*h*(10 + 24/tp) bytes, s*b*h*34/tp with sequence parallel, or
2*s*b*h (/tp with SP) kept per layer plus one layer's full working set with activation checkpointing;
stage i of a 1F1B pipeline holds pp - i microbatches in flight. The frozen trunk runs forward only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from ..config import RunConfig
from ..models.transformer import Transformer, TransformerConfig
from .dims import ParallelDims
from .fsdp import apply_fsdp
from .stage_split import Head, balanced_split, imbalance, layer_costs, stage_costs
from .tensor_parallel import apply_tensor_parallel

TRAINABLE_BYTES = {"params": 4, "grads": 4, "optimizer": 8}
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
ROLES = {"policy": True, "reference": False, "critic": True, "reward": False}  # role -> trainable
IMBALANCE_WARNING = 0.2  # busiest stage's cost over the mean, minus 1
GIB = 2**30


# ---------------------------------------------------------------------------------------------- counting


def _local_numel(module: nn.Module) -> int:
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters())


def component_params(arch: TransformerConfig) -> dict[str, int]:
    """Full (unsharded) element counts of the components, from meta modules."""
    with torch.device("meta"):
        one = Transformer(TransformerConfig(**{**asdict(arch), "num_layers": 1, "tie_word_embeddings": False}))
    h = arch.hidden_size
    return {
        "embedding": one.embed_tokens.weight.numel(),
        "layer": sum(p.numel() for p in one.layers["0"].parameters()),
        "lm_head": h + arch.vocab_size * h,  # final norm + output projection
        "scalar_head": h + h,  # final norm + (1, h) value/reward projection
    }


def exact_shards(arch: TransformerConfig, dims: ParallelDims, sequence_parallel: bool) -> dict[str, int]:
    """Per-rank element counts of each component under the real TP and FSDP2 plans (rank 0, meta)."""
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        one = Transformer(TransformerConfig(**{**asdict(arch), "num_layers": 1, "tie_word_embeddings": False}))
        scalar = nn.Sequential(type(one.norm)(arch.hidden_size, eps=arch.rms_norm_eps),
                               nn.Linear(arch.hidden_size, 1, bias=False))  # final norm + value/reward head
    apply_tensor_parallel(one, mesh["tp"], sequence_parallel=sequence_parallel)
    apply_fsdp(one, mesh["dp_shard"])  # replicated dp groups (HSDP) hold the same shard sizes
    if dims.dp_shard > 1:
        fully_shard(scalar, mesh=mesh["dp_shard"])  # a (1, h) head is replicated over tp, sharded over dp
    return {
        "embedding": _local_numel(one.embed_tokens),
        "layer": _local_numel(one.layers["0"]),
        "lm_head": _local_numel(one.norm) + _local_numel(one.lm_head),
        "scalar_head": _local_numel(scalar),
    }


def formula_shards(arch: TransformerConfig, dims: ParallelDims) -> dict[str, int]:
    """The same per-rank counts in closed form (Megatron layout, FSDP's ceil-split of dim 0)."""
    h, d, tp, dp = arch.hidden_size, arch.head_dim, dims.tp, dims.dp_shard
    q_rows, kv_rows, ffn = arch.num_heads * d // tp, arch.num_kv_heads * d // tp, arch.intermediate_size // tp

    def rows(n: int) -> int:  # rows of an n-row (tp-local) matrix that FSDP leaves on rank 0
        return math.ceil(n / dp)

    layer = (
        2 * rows(h)  # input and post-attention norms (replicated over tp)
        + (rows(q_rows) + 2 * rows(kv_rows)) * h  # q, k, v: column-parallel
        + rows(h) * q_rows  # o: row-parallel
        + 2 * rows(ffn) * h + rows(h) * ffn  # gate, up (column), down (row)
        + (rows(q_rows) + 2 * rows(kv_rows) if arch.qkv_bias else 0)
        + (rows(h) if arch.o_bias else 0)
        + (2 * rows(ffn) + rows(h) if arch.mlp_bias else 0)
    )
    vocab_rows = rows(arch.vocab_size // tp)
    return {
        "embedding": vocab_rows * h,
        "layer": layer,
        "lm_head": rows(h) + vocab_rows * h,
        "scalar_head": rows(h) + rows(1) * h,
    }


# ---------------------------------------------------------------------------------------------- assembling


@dataclass
class Share:
    """What one role (or the trunk) holds on one rank of one pipeline stage."""

    params_total: int = 0  # elements over the whole model (all ranks)
    params: int = 0  # elements on this rank
    trainable: bool = False
    layers: int = 0
    bytes: dict[str, int] = field(default_factory=dict)

    def finish(self, frozen_bytes: int = 2) -> "Share":
        per = TRAINABLE_BYTES if self.trainable else {"params": frozen_bytes, "grads": 0, "optimizer": 0}
        self.bytes = {k: self.params * v for k, v in per.items()}
        return self


def activation_bytes_per_layer(cfg: RunConfig, dims: ParallelDims) -> int:
    s, b, h, tp = cfg.data.seq_len, cfg.trainer.micro_batch_size, cfg.model.architecture.hidden_size, dims.tp
    sp = cfg.parallel.sequence_parallel and tp > 1
    if cfg.parallel.activation_checkpointing:
        return 2 * s * b * h // (tp if sp else 1)
    return s * b * h * 34 // tp if sp else s * b * h * (10 + 24 // tp)


def plan(cfg: RunConfig, world_size: int, gpu_memory_gb: float = 80.0) -> dict[str, Any]:
    """Per-stage, per-role memory of ``cfg``'s layout on ``world_size`` ranks (a fake process group)."""
    arch = cfg.model.architecture
    if arch is None:
        raise ValueError("plan needs model.architecture (the dry run builds the model from its shape)")
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    dims.check_model(arch)
    created = False
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
        created = True
    try:
        shards = exact_shards(arch, dims, cfg.parallel.sequence_parallel)
    finally:
        if created:
            dist.destroy_process_group()
    full = component_params(arch)
    L, k, pp, chunks = arch.num_layers, cfg.model.trunk_layers, dims.pp, cfg.parallel.pp_stages_per_rank if dims.pp > 1 else 1
    heads = [Head("lm" if role in ("policy", "reference") else "scalar", trainable) for role, trainable in ROLES.items()]
    costs, output_cost = layer_costs(arch, trunk_layers=k, heads=heads, seq_len=cfg.data.seq_len)
    split = balanced_split(costs, pp * chunks, output_cost=output_cost, first=cfg.parallel.pp_first_stage_layers,
                           last=cfg.parallel.pp_last_stage_layers) if pp > 1 else [(0, L)]
    cost_of_stage = stage_costs(split, costs, output_cost)
    tokens = cfg.data.seq_len * cfg.trainer.micro_batch_size * cfg.trainer.grad_accum_steps  # per dp rank and step
    frozen_bytes = DTYPE_BYTES[cfg.precision.dtype]
    act_layer = activation_bytes_per_layer(cfg, dims)
    sp = cfg.parallel.sequence_parallel and dims.tp > 1
    one_layer_full = cfg.data.seq_len * cfg.trainer.micro_batch_size * arch.hidden_size * (34 // dims.tp if sp else 10 + 24 // dims.tp)
    layer_gather = 2 * 2 * full["layer"] // dims.tp  # two unsharded bf16 layers (tp-local)

    stages = []
    for stage in range(pp):  # a pipeline rank: its stages (several with interleaving)
        mine = [split[s] for s in range(stage, pp * chunks, pp)]
        first, last = stage == 0, stage == pp - 1
        trunk_layers = sum(max(0, min(hi, k) - lo) for lo, hi in mine)
        head_layers = sum(hi - lo for lo, hi in mine) - trunk_layers
        holders: dict[str, Share] = {}
        if k > 0:
            holders["trunk"] = Share(
                params_total=full["embedding"] + k * full["layer"],
                params=(shards["embedding"] if first else 0) + trunk_layers * shards["layer"],
                layers=trunk_layers,
            ).finish(frozen_bytes)
        for role, trainable in ROLES.items():
            head = "lm_head" if role in ("policy", "reference") else "scalar_head"
            own_embedding = k == 0
            holders[role] = Share(
                params_total=(full["embedding"] if own_embedding else 0) + (L - k) * full["layer"] + full[head],
                params=(shards["embedding"] if own_embedding and first else 0) + head_layers * shards["layer"]
                + (shards[head] if last else 0),
                trainable=trainable,
                layers=head_layers,
            ).finish(frozen_bytes)
        in_flight = pp - stage  # 1F1B: microbatches whose activations stage i holds
        trained_layers = max(holders[r].layers for r in ROLES if ROLES[r])
        activations = in_flight * trained_layers * act_layer
        if cfg.parallel.activation_checkpointing and trained_layers:
            activations += one_layer_full  # the layer being recomputed
        state_bytes = sum(sum(h.bytes.values()) for h in holders.values())
        total = state_bytes + activations + (layer_gather if dims.dp_shard > 1 else 0)
        flops_per_token = sum(cost_of_stage[s] for s in range(stage, pp * chunks, pp))
        stages.append({
            "stage": stage,
            "layers": [list(r) for r in mine] if chunks > 1 else list(mine[0]),
            "holders": {name: asdict(h) for name, h in holders.items()},
            "flops_per_step": flops_per_token * tokens / dims.tp,
            "model_state_bytes": state_bytes,
            "activation_bytes": activations,
            "fsdp_buffer_bytes": layer_gather if dims.dp_shard > 1 else 0,
            "total_bytes": total,
        })
    spread = imbalance([s["flops_per_step"] for s in stages])
    warnings = []
    if spread > IMBALANCE_WARNING:
        warnings.append(f"pipeline stages are imbalanced: the busiest does {spread:.0%} more work than the mean "
                        "(set parallel.pp_first_stage_layers / pp_last_stage_layers, or change pp or trunk_layers)")
    worst = max(stages, key=lambda s: s["total_bytes"])
    totals = {name: {"params_total": stages[0]["holders"][name]["params_total"],
                     "params_per_rank_max": max(s["holders"][name]["params"] for s in stages)}
              for name in stages[0]["holders"]}
    return {
        "world_size": world_size,
        "layout": {"dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "pp": dims.pp, "tp": dims.tp,
                   "sequence_parallel": cfg.parallel.sequence_parallel,
                   "activation_checkpointing": cfg.parallel.activation_checkpointing},
        "model": {"layers": L, "trunk_layers": k, "hidden": arch.hidden_size, "heads": arch.num_heads,
                  "vocab": arch.vocab_size, "params_per_model": full["embedding"] + L * full["layer"] + full["lm_head"]},
        "component_params": full,
        "component_shards_per_rank": shards,
        "roles": totals,
        "stages": stages,
        "flops_imbalance": spread,
        "warnings": warnings,
        "max_rank_bytes": worst["total_bytes"],
        "gpu_memory_bytes": int(gpu_memory_gb * GIB),
        "fits": worst["total_bytes"] <= gpu_memory_gb * GIB,
    }


def format_plan(p: dict[str, Any]) -> str:
    """A human-readable table of ``plan``'s result."""
    lay = p["layout"]
    lines = [
        f"world {p['world_size']}: dp_replicate {lay['dp_replicate']} x dp_shard {lay['dp_shard']} x pp {lay['pp']} x tp {lay['tp']}"
        f" (sp={lay['sequence_parallel']}, activation checkpointing={lay['activation_checkpointing']})",
        f"model: {p['model']['layers']} layers (trunk {p['model']['trunk_layers']}), hidden {p['model']['hidden']}, "
        f"{p['model']['params_per_model'] / 1e9:.2f}B parameters per full model",
        "",
        f"{'stage':>5} {'holder':<10} {'layers':>6} {'params/rank':>13} {'params GiB':>10} {'grads GiB':>9} {'optim GiB':>9}",
    ]
    for s in p["stages"]:
        for name, h in s["holders"].items():
            b = h["bytes"]
            lines.append(f"{s['stage']:>5} {name:<10} {h['layers']:>6} {h['params']:>13,} {b['params'] / GIB:>10.2f} "
                         f"{b['grads'] / GIB:>9.2f} {b['optimizer'] / GIB:>9.2f}")
        lines.append(f"{'':>5} layers {s['layers']}, {s['flops_per_step'] / 1e12:.1f} TFLOP per step, activations "
                     f"{s['activation_bytes'] / GIB:.2f} GiB, FSDP buffers {s['fsdp_buffer_bytes'] / GIB:.2f} GiB, "
                     f"stage total {s['total_bytes'] / GIB:.2f} GiB")
    lines.append(f"\nstage work imbalance (busiest / mean - 1): {p['flops_imbalance']:.0%}")
    lines += [f"warning: {w}" for w in p["warnings"]]
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"\nbusiest rank: {p['max_rank_bytes'] / GIB:.2f} GiB of {p['gpu_memory_bytes'] / GIB:.0f} GiB: {verdict}")
    return "\n".join(lines)
