"""Pipeline parallelism with torch.distributed.pipelining: stage split and schedules.

    stages = split_into_stages(model, pp_rank, pp_size, stages_per_rank=2)     # this rank's stages
    schedule = build_schedule(stages, pp_mesh, "interleaved_1f1b", n_microbatches=8, loss_fn=loss_fn)
    schedule.step(input_ids, document_ids=docs, targets=targets, target=targets, losses=losses)  # first rank
    schedule.step(document_ids=docs, targets=targets, target=targets, losses=losses)             # other ranks

Split: the L layers are divided evenly into pp_size * stages_per_rank stages; the embedding goes to the
first stage and the final norm and LM head to the last. With several stages per rank they are assigned
round-robin (rank r holds stages r, r + pp, ...), as the interleaved 1F1B schedule (Narayanan et al.
2021) requires. A stage is a ``Transformer`` that shares the full model's submodules (no copy) and keeps
their parameter names, so checkpoints move between pipeline layouts.

Between stages only the residual stream (B, S, D) travels; ``document_ids`` and ``targets`` are given to
every stage as keyword arguments through each rank's own ``step`` call and split into microbatches the
same way. The last stage returns the tuple (logp, entropy) from the fused LM-head kernel, and
``loss_fn(output, target)`` turns one microbatch into its share of the step's loss: with
``scale_grads=False`` (used here) losses are summed over microbatches, so each must be its microbatch's
contribution to the global mean.

Tied embeddings with pp > 1 are refused: the embedding and the head would live on different ranks.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from ..models.transformer import Transformer
from .dims import LayoutError

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def stage_layer_ranges(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """[lo, hi) layer ranges of the stages, balanced; the layer count must divide evenly."""
    if num_layers % num_stages:
        raise LayoutError(f"num_layers={num_layers} is not divisible by the {num_stages} pipeline stages")
    per = num_layers // num_stages
    return [(s * per, (s + 1) * per) for s in range(num_stages)]


def make_stage(model: Transformer, lo: int, hi: int, *, first: bool, last: bool) -> Transformer:
    """A Transformer holding layers [lo, hi) of ``model`` (shared, not copied), the embedding if
    ``first`` and the final norm and LM head if ``last``."""
    stage = Transformer.__new__(Transformer)
    nn.Module.__init__(stage)
    stage.config = model.config
    stage._inv_freq = {}
    stage.embed_tokens = model.embed_tokens if first else None
    stage.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in range(lo, hi)})
    stage.norm = model.norm if last else None
    stage.lm_head = model.lm_head if last else None
    return stage


def split_into_stages(model: Transformer, pp_rank: int, pp_size: int, stages_per_rank: int = 1) -> list[tuple[int, Transformer]]:
    """This rank's (stage index, stage module) pairs."""
    if model.config.tie_word_embeddings and pp_size > 1:
        raise LayoutError("tie_word_embeddings with pp > 1 is not supported: the embedding (first stage) and "
                          "the LM head (last stage) would live on different ranks; untie or use pp=1")
    num_stages = pp_size * stages_per_rank
    ranges = stage_layer_ranges(model.config.num_layers, num_stages)
    mine = range(pp_rank, num_stages, pp_size)
    return [(s, make_stage(model, *ranges[s], first=s == 0, last=s == num_stages - 1)) for s in mine]


class _TensorsOut(nn.Module):
    """Last stage adapter: pipelining passes only tensors, so (logp, entropy) instead of LogprobOutput."""

    def __init__(self, stage: Transformer) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, *args, **kwargs):
        out = self.stage(*args, **kwargs)
        return (out.logp, out.entropy)


def build_schedule(
    stages: list[tuple[int, Transformer]],
    pp_mesh: DeviceMesh,
    schedule: str,
    *,
    n_microbatches: int,
    loss_fn: Callable,
    device: torch.device | str = "cpu",
):
    """A pipelining schedule over this rank's stages (one stage for gpipe/1f1b, several for interleaved)."""
    if schedule not in SCHEDULES:
        raise LayoutError(f"unknown pipeline schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    num_stages = pp_mesh.size() * len(stages)
    pipeline_stages = [
        PipelineStage(_TensorsOut(module) if index == num_stages - 1 else module, index, num_stages,
                      torch.device(device), group=pp_mesh.get_group())
        for index, module in stages
    ]
    cls = SCHEDULES[schedule]
    if cls is ScheduleInterleaved1F1B:
        return cls(pipeline_stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    if len(pipeline_stages) != 1:
        raise LayoutError(f"schedule {schedule!r} runs one stage per rank; use interleaved_1f1b for more")
    return cls(pipeline_stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
