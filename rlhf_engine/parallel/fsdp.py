"""Fully sharded data parallelism (FSDP2, ZeRO-3 style) over the data-parallel mesh.

    apply_fsdp(model, mesh["dp_shard"], param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

Each decoder layer is its own FSDP unit (parameters all-gathered just before it runs, freed after,
gradients reduce-scattered), and the root holds the embedding, final norm and LM head. Applied after
tensor parallelism, the parameters become 2-D DTensors (dp_shard x tp). Mixed precision: parameters
are gathered and computed in ``param_dtype`` while sharded master weights, optimizer state and the
gradient reduction stay in fp32 (``reduce_dtype``).

Hybrid sharding (HSDP): pass the 2-D mesh ``mesh["dp_replicate", "dp_shard"]``; FSDP2 shards over the
inner dimension and all-reduces gradients over the outer one.

FSDP averages gradients over the data-parallel ranks: a loss that is a mean over the *global* batch
must be scaled by the data-parallel degree on each rank (sum of local terms / global count * dp).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..models.transformer import Transformer


def decoder_parts(model) -> list[Transformer]:
    """The ``Transformer`` pieces of a model: itself, or a role/score model's trunk and heads (of the
    model a pipeline stage wraps, for a ``PipelinedModel``)."""
    model = getattr(model, "wrapped", model)
    if isinstance(model, Transformer):
        return [model]
    heads = list(model.heads.values()) if hasattr(model, "heads") else [model.head]
    return ([model.trunk] if model.trunk is not None else []) + [h for h in heads if h is not None]


def apply_fsdp(
    model: Transformer,
    dp_mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> Transformer:
    """Shard ``model`` (a Transformer, RoleModel or ScoreModel) in place over ``dp_mesh`` (1-D: FSDP, 2-D:
    HSDP); a no-op for a one-rank mesh."""
    if dp_mesh.size() == 1:
        return model
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in (layer for part in decoder_parts(model) for layer in part.layers.values()):
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model
