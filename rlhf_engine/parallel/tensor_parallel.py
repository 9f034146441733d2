"""Tensor (and sequence) parallelism for the Llama-family decoder, in Megatron's layout, with DTensor.

    apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True)

Per decoder layer: q/k/v and gate/up projections column-parallel (heads and the FFN width split across
ranks, no communication on the way in), o and down projections row-parallel (one all-reduce each, or a
reduce-scatter under sequence parallelism). The embedding and the LM head are vocabulary-parallel:
the LM head's weight stays sharded and ``Transformer.forward(targets=...)`` hands the local shard,
its offset and the group to ``rlhf_kernels.linear_logprob``, whose one all-gather of 32 bytes per
token replaces gathering [N, V] logits.

Sequence parallel (Korthikanti et al. 2022): between the row- and column-parallel regions the
residual stream is split along the sequence, so norms and residual adds run on S / tp tokens per rank;
attention and the MLP all-gather their input; the final norm's output is all-gathered before the LM head.
The sequence length must then be divisible by tp.

FP8 (``precision.fp8``, applied before this): a torchao ``Float8Linear`` with tensor-wise dynamic
scaling gets torchao's float8 styles, which cast to float8 *before* communicating, so the
sequence-parallel all-gather of a block's input moves float8 bytes, once for q/k/v (and once for
gate/up); the amax of a sharded tensor is reduced over the shards, so the scales are those of one
process. Those float8 collectives need NCCL: gloo has no float8 dtypes, so on CPU with sequence
parallelism the plain styles gather in high precision and cast after, with the same numbers. Row-wise
scaling keeps the plain styles: its per-row scales of a row-parallel layer's input are then taken per
shard (finer, not bitwise equal to one process).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from ..models.lora import LoRALinear
from ..models.transformer import Transformer
from .fsdp import decoder_parts



def apply_tensor_parallel(model, tp_mesh: DeviceMesh, *, sequence_parallel: bool = False):
    """Shard ``model`` in place over ``tp_mesh`` (a 1-D mesh); a no-op when the mesh has one rank.

    A ``RoleModel`` (or ``ScoreModel``) is sharded part by part, the trunk and every head the same way, so boundary states
    flow from the trunk into any head unchanged (the scalar critic/reward projections stay replicated).
    """
    if tp_mesh.size() == 1:
        return model
    # torch's SequenceParallel re-creates norm weights as new Parameters that require grad: a frozen norm
    # (a LoRA head's, a frozen trunk's) would start training. Every parameter keeps its flag.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    _shard(model, tp_mesh, sequence_parallel)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return model


def _shard(model, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    if not isinstance(model, Transformer):
        for part in decoder_parts(model):
            _shard(part, tp_mesh, sequence_parallel)
            if getattr(part, "score", None) is not None:
                _replicate(part.score, tp_mesh)
        return
    sp = sequence_parallel
    residual = Shard(1) if sp else Replicate()  # layout of the residual stream between blocks

    # A pipeline stage holds the embedding only if first and the norm and LM head only if last.
    root_plan = {}
    if model.embed_tokens is not None:
        root_plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if model.lm_head is not None:  # tied: the embedding's row (vocabulary) sharding is the LM head's
        lora = isinstance(model.lm_head, LoRALinear)
        root_plan["lm_head"] = (_LoRAColwise if lora else ColwiseParallel)(use_local_output=False)
    if sp and model.norm is not None:
        root_plan["norm"] = SequenceParallel()
    if root_plan:
        parallelize_module(model, tp_mesh, root_plan)
    if sp and model.norm is not None:  # the LM head needs every token: gather the final norm's output
        parallelize_module(model.norm, tp_mesh, PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate()))

    for layer in model.layers.values():
        # torchao's float8 styles communicate float8 tensors under sequence parallelism (the block input's
        # all-gather, the gradient's all-gather in backward); gloo has no float8 dtypes.
        styles = _Styles(layer, float8_styles=tp_mesh.device_type == "cuda" or not sp)
        plan = {
            "self_attn.q_proj": styles.colwise("self_attn.q_proj"),
            "self_attn.k_proj": styles.colwise("self_attn.k_proj"),
            "self_attn.v_proj": styles.colwise("self_attn.v_proj"),
            "self_attn.o_proj": styles.rowwise("self_attn.o_proj", output_layouts=residual),
            "mlp.gate_proj": styles.colwise("mlp.gate_proj"),
            "mlp.up_proj": styles.colwise("mlp.up_proj"),
            "mlp.down_proj": styles.rowwise("mlp.down_proj", output_layouts=residual),
        }
        if sp:
            plan.update({
                "input_layernorm": SequenceParallel(),
                # Gemma's sandwich: post_attention_layernorm and post_feedforward_layernorm normalise a block's
                # output before the residual add, so they hand back local tensors like the residual's
                "post_attention_layernorm": SequenceParallel(use_local_output=layer.sandwich),
                **({"pre_feedforward_layernorm": SequenceParallel(),
                    "post_feedforward_layernorm": SequenceParallel(use_local_output=True)} if layer.sandwich else {}),
                # attention gets (x, cos, sin, mask, cache); only x is sequence-sharded
                "self_attn": styles.gather_input("self_attn", ("q_proj", "k_proj", "v_proj"), extra_args=4),
                "mlp": styles.gather_input("mlp", ("gate_proj", "up_proj"), extra_args=0),
            })
        parallelize_module(layer, tp_mesh, plan)


class _Styles:
    """Megatron's styles for one decoder layer's linears, float8-aware (module docstring)."""

    def __init__(self, layer, *, float8_styles: bool) -> None:
        self.layer = layer
        self.float8_styles = float8_styles

    def float8(self, name: str) -> bool:
        """Whether ``name`` is a torchao Float8Linear with tensor-wise dynamic scaling of its input."""
        module = self.layer.get_submodule(name)
        if not self.float8_styles or type(module).__name__ != "Float8Linear":
            return False
        from torchao.float8.config import ScalingGranularity, ScalingType  # optional: torchao (precision.fp8)

        cast = module.config.cast_config_input
        return cast.scaling_type == ScalingType.DYNAMIC and cast.scaling_granularity == ScalingGranularity.TENSORWISE

    def colwise(self, name: str):
        if isinstance(self.layer.get_submodule(name), LoRALinear):
            return _LoRAColwise()
        if self.float8(name):
            from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel  # optional: torchao

            return Float8ColwiseParallel()
        return ColwiseParallel()

    def rowwise(self, name: str, *, output_layouts):
        if isinstance(self.layer.get_submodule(name), LoRALinear):
            return _LoRARowwise(output_layouts=output_layouts)
        if self.float8(name):
            from torchao.float8.float8_tensor_parallel import Float8RowwiseParallel  # optional: torchao

            return Float8RowwiseParallel(output_layouts=output_layouts)
        return RowwiseParallel(output_layouts=output_layouts)

    def gather_input(self, block: str, consumers: tuple[str, ...], *, extra_args: int):
        """Sequence parallel: all-gather the block's sequence-sharded first input (the others pass through);
        in float8, cast once before the gather, when every consumer is a tensor-wise Float8Linear."""
        layouts = (Shard(1),) + (None,) * extra_args
        desired = (Replicate(),) + (None,) * extra_args
        if all(self.float8(f"{block}.{c}") for c in consumers):
            from torchao.float8.float8_tensor_parallel import PrepareFloat8ModuleInput  # optional: torchao

            return PrepareFloat8ModuleInput(input_layouts=layouts, desired_input_layouts=desired,
                                            fwd_config_submodule_fqn=consumers[0])
        return PrepareModuleInput(input_layouts=layouts, desired_input_layouts=desired)


def _distribute(module, mesh: DeviceMesh, placements: dict[str, Placement], src_data_rank) -> None:
    for name, placement in placements.items():
        param = getattr(module, name)
        module.register_parameter(name, nn.Parameter(
            distribute_tensor(param, mesh, [placement], src_data_rank=src_data_rank), requires_grad=param.requires_grad))


class _LoRAColwise(ColwiseParallel):
    """Column-parallel LoRALinear: W (out, in), its bias and B (out, r) split by output rows, A (r, in)
    whole on every rank, so each rank computes its output columns' update x A^T B_local^T exactly."""

    def _partition_linear_fn(self, name, module, device_mesh):
        if not isinstance(module, LoRALinear):  # called for every submodule: the dropout holds nothing
            return
        _distribute(module, device_mesh, {n: Replicate() if n == "lora_A" else Shard(0)
                                          for n, _ in module.named_parameters()}, self.src_data_rank)


class _LoRARowwise(RowwiseParallel):
    """Row-parallel LoRALinear: W and A (r, in) split by input columns (their partial products are summed
    with the base's), B (out, r) and the bias whole."""

    def _partition_linear_fn(self, name, module, device_mesh):
        if not isinstance(module, LoRALinear):
            return
        super()._partition_linear_fn(name, module, device_mesh)
        _distribute(module, device_mesh, {"lora_A": Shard(1), "lora_B": Replicate()}, self.src_data_rank)


def _replicate(module, tp_mesh: DeviceMesh) -> None:
    """A small module kept whole on every tp rank (a scalar value/reward head): its parameters become
    replicated DTensors, so gradient clipping and checkpoints see one kind of tensor; it takes and
    returns plain tensors."""

    def to_dtensor(mod, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    def to_local(mod, output, mesh):
        return output.to_local() if isinstance(output, DTensor) else output

    distribute_module(module, tp_mesh, input_fn=to_dtensor, output_fn=to_local)
