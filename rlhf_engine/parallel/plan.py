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
from .stage_split import Head, balanced_split, imbalance, layer_costs, layer_flops, stage_costs
from .tensor_parallel import apply_tensor_parallel

TRAINABLE_BYTES = {"params": 4, "grads": 4, "optimizer": 8}
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
ROLES = {"policy": True, "reference": False, "critic": True, "reward": False}  # role -> trainable
IMBALANCE_WARNING = 0.2  # busiest stage's cost over the mean, minus 1
H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM
MFU = {"generation": 0.10, "training": 0.40}  # assumed: decoding is memory-bound, forward/backward is not
INSTRUCTGPT_PPO_PFS_DAYS = 60.0  # Ouyang et al. 2022: training the 175B PPO-ptx model
INSTRUCTGPT_EPISODES = 256_000
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


def rl_step(cfg: RunConfig, dims: ParallelDims, full: dict[str, int]) -> dict[str, Any]:
    """One PPO iteration of ``cfg``: generation on the policy gathered whole per rank (tp-sharded, pp
    folded into dp), the experience forward through the roles, and the update of policy and critic
    heads from cached trunk states. FLOPs are matmul FLOPs (2 per multiply-add) over the whole job."""
    arch, rl = cfg.model.architecture, cfg.algorithm.rl
    L, k, D, V = arch.num_layers, cfg.model.trunk_layers, arch.hidden_size, arch.vocab_size
    f = layer_flops(arch, cfg.data.seq_len)
    rows = rl.prompts_per_rollout * rl.group
    tokens = rows * cfg.data.seq_len  # prompt + response per sequence, at most seq_len
    lm = 2.0 * D * V  # one LM head's forward per token
    generation = tokens * (L * f + lm)
    heads = [Head("lm" if r in ("policy", "reference") else "scalar", t) for r, t in ROLES.items()]
    experience = tokens * (k * f + (L - k) * len(heads) * f + 2 * lm)
    update = rl.epochs * tokens * ((L - k) * 2 * 3 * f + 3 * lm)  # policy and critic heads, fwd + bwd
    seconds = {"generation": generation / (dims.world_size * H100_BF16_FLOPS * MFU["generation"]),
               "experience": experience / (dims.world_size * H100_BF16_FLOPS * MFU["training"]),
               "update": update / (dims.world_size * H100_BF16_FLOPS * MFU["training"])}
    dtype_bytes = DTYPE_BYTES[cfg.precision.dtype]
    policy_params = full["embedding"] + L * full["layer"] + full["lm_head"]
    rows_per_rank = math.ceil(rows / dims.dp)  # pipeline peers decode the same rows
    kv = 2 * L * rows_per_rank * cfg.data.seq_len * arch.num_kv_heads * arch.head_dim // dims.tp * dtype_bytes
    iterations = math.ceil(INSTRUCTGPT_EPISODES / rows)
    total = iterations * (generation + experience + update)
    return {
        "rollout_sequences": rows,
        "flops_per_iteration": {"generation": generation, "experience": experience, "update": update},
        "assumed_mfu": MFU,
        "estimated_seconds_per_iteration_h100": seconds,
        "generation_copy_bytes_per_rank": policy_params // dims.tp * dtype_bytes,
        "generation_kv_cache_bytes_per_rank": kv,
        "iterations_for_instructgpt_episodes": iterations,
        "pfs_days_for_instructgpt_episodes": total / (1e15 * 86400),
        "instructgpt_pfs_days": INSTRUCTGPT_PPO_PFS_DAYS,
    }


def plan(cfg: RunConfig, world_size: int, gpu_memory_gb: float = 80.0) -> dict[str, Any]:
    """Per-stage, per-role memory of ``cfg``'s layout on ``world_size`` ranks (a fake process group)."""
    arch = cfg.model.architecture
    if arch is None:
        raise ValueError("plan needs model.architecture (the dry run builds the model from its shape)")
    if cfg.model.trunk_layers == "auto":
        raise ValueError("plan needs a number for model.trunk_layers (auto is measured on a trained SFT model by "
                         "rlhf-engine probe)")
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
    rl = rl_step(cfg, dims, full)
    for s in stages:  # decoding: the model state stays, activations are gone, the policy copy and KV cache come
        s["generation_bytes"] = (s["model_state_bytes"] + rl["generation_copy_bytes_per_rank"]
                                 + rl["generation_kv_cache_bytes_per_rank"])
        s["peak_bytes"] = max(s["total_bytes"], s["generation_bytes"])
    worst = max(stages, key=lambda s: s["peak_bytes"])
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
        "rl": rl,
        "max_rank_bytes": worst["peak_bytes"],
        "gpu_memory_bytes": int(gpu_memory_gb * GIB),
        "fits": worst["peak_bytes"] <= gpu_memory_gb * GIB,
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
                     f"stage total {s['total_bytes'] / GIB:.2f} GiB; while decoding {s['generation_bytes'] / GIB:.2f} GiB")
    lines.append(f"\nstage work imbalance (busiest / mean - 1): {p['flops_imbalance']:.0%}")
    rl = p["rl"]
    flops, secs = rl["flops_per_iteration"], rl["estimated_seconds_per_iteration_h100"]
    lines.append(f"PPO iteration ({rl['rollout_sequences']} sequences): " + ", ".join(
        f"{k} {flops[k] / 1e15:.0f} PFLOP ~{secs[k]:.1f} s" for k in flops)
        + f" on H100s at MFU {rl['assumed_mfu']['generation']:.0%} (generation) / {rl['assumed_mfu']['training']:.0%}")
    lines.append(f"generation layout (tp x dp, pp folded into dp): policy copy {rl['generation_copy_bytes_per_rank'] / GIB:.1f}"
                 f" GiB + KV cache {rl['generation_kv_cache_bytes_per_rank'] / GIB:.1f} GiB per rank, freed after decoding")
    lines.append(f"InstructGPT's {INSTRUCTGPT_EPISODES:,} episodes: {rl['iterations_for_instructgpt_episodes']} iterations, "
                 f"{rl['pfs_days_for_instructgpt_episodes']:.0f} PF/s-days (InstructGPT's 175B PPO-ptx: "
                 f"{rl['instructgpt_pfs_days']:.0f})")
    lines += [f"warning: {w}" for w in p["warnings"]]
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"\nbusiest rank: {p['max_rank_bytes'] / GIB:.2f} GiB of {p['gpu_memory_bytes'] / GIB:.0f} GiB: {verdict}")
    return "\n".join(lines)
