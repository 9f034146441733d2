"""The process runtime of a stage: device, process group, mesh, and how a model is parallelized.

    rt = init_runtime(cfg)              # reads torchrun's WORLD_SIZE / RANK / LOCAL_RANK
    model = rt.parallelize(model, cfg)  # tensor (+ sequence) parallel, then FSDP2 / HSDP
    totals = rt.sum_over_dp({"targets": n})

The same stage code runs as one process (``rlhf-engine sft ...``) or under torchrun / Slurm
(``scripts/torchrun.sh 4 sft ...``): NCCL on CUDA, gloo on CPU. Order of application is fixed:
pipeline stages first (pp > 1: the model is pruned to this rank's stages, ``parallel/pipeline.py``),
then tensor parallel on ``mesh['tp']``, then activation checkpointing (if configured), then FSDP over
the data-parallel mesh (2-D for HSDP), so parameters become (dp, tp) DTensors. Under pp > 1
``parallelize`` returns a ``PipelinedModel``, whose ``run`` the trainer calls for forward and backward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..config import RunConfig
from .activation_checkpoint import apply_activation_checkpointing
from .compile import compile_decoder_layers, wants_compiled_layers
from .dims import LayoutError, ParallelDims
from .fp8 import apply_fp8
from .fsdp import apply_fsdp
from .pipeline import PipelinedModel, embedding_group, plan_split, prune_to_stages
from .schedules import check_schedule
from .tensor_parallel import apply_tensor_parallel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_OWN_PROCESS_GROUP = False  # set when init_runtime created the default process group (not an embedding stack)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto': this process's GPU when CUDA is present, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


@dataclass
class Runtime:
    device: torch.device
    dims: ParallelDims
    mesh: DeviceMesh | None  # None in a single process
    rank: int

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        if self.mesh is None:
            return 0
        return self.mesh["dp_replicate"].get_local_rank() * self.dims.dp_shard + self.mesh["dp_shard"].get_local_rank()

    def parallelize(self, model, cfg: RunConfig):
        """Apply the configured layout to ``model`` (on this runtime's device) in place."""
        dtype = DTYPES[cfg.precision.dtype]
        fp8 = cfg.precision.fp8
        compiled = wants_compiled_layers(cfg.parallel.compile_layers, fp8, self.device.type)
        if self.mesh is None:
            model = apply_fp8(model.to(device=self.device, dtype=dtype), fp8)
            if cfg.parallel.activation_checkpointing:
                model = apply_activation_checkpointing(model)
            return compile_decoder_layers(model) if compiled else model
        p = cfg.parallel
        self.dims.check_model(model.config, stages=p.pp_stages_per_rank)
        split = None
        if self.dims.pp > 1:
            check_schedule(p.pp_schedule, pp=self.dims.pp, chunks=p.pp_stages_per_rank,
                           microbatches=cfg.trainer.grad_accum_steps)
            split = plan_split(model, stages=self.dims.pp * p.pp_stages_per_rank, seq_len=cfg.data.seq_len,
                               first=p.pp_first_stage_layers, last=p.pp_last_stage_layers)
            prune_to_stages(model, split, self.pp_rank, self.dims.pp)
        if fp8 is not None and fp8.backend == "te" and self.dims.tp > 1:
            raise LayoutError("precision.fp8.backend=te with parallel.tp > 1: Transformer Engine's own tensor-parallel "
                              "linears are not wired; use precision.fp8.backend=torchao with tp, or te with dp_shard")
        model.to(self.device)  # fp32 masters; FSDP computes in `dtype`
        apply_fp8(model, fp8)
        apply_tensor_parallel(model, self.mesh["tp"], sequence_parallel=cfg.parallel.sequence_parallel)
        if cfg.parallel.activation_checkpointing:
            apply_activation_checkpointing(model)
        if compiled:
            compile_decoder_layers(model)
        if split is not None:
            tied = model.config.tie_word_embeddings and not hasattr(model, "trunk_layers")
            model = PipelinedModel(model, split, pp_group=self.mesh["pp"].get_group(), pp_rank=self.pp_rank,
                                   pp=self.dims.pp, schedule=p.pp_schedule, chunks=p.pp_stages_per_rank,
                                   device=self.device, embedding_group=embedding_group(self.mesh, self.dims.pp) if tied else None)
        dp_mesh = self.mesh["dp_replicate", "dp_shard"] if self.dims.dp_replicate > 1 else self.mesh["dp_shard"]
        if dp_mesh.size() > 1:
            apply_fsdp(model, dp_mesh, param_dtype=dtype, reduce_dtype=torch.float32)
        elif dtype != torch.float32:
            model.to(dtype)
        return model

    @property
    def pp_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh["pp"].get_local_rank()

    @property
    def loss_scale(self) -> float:
        """FSDP averages gradients over data-parallel ranks; a global-mean loss is scaled back up."""
        return float(self.dims.dp) if self.mesh is not None and self.dims.dp > 1 else 1.0

    def sum_over_dp(self, values: dict[str, float]) -> dict[str, float]:
        """Sum per-rank numbers over the data-parallel ranks (tensor/pipeline peers hold the same values)."""
        if self.mesh is None:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        t /= self.dims.tp * self.dims.pp
        return dict(zip(keys, t.tolist()))

    def any_rank(self, flags: list[bool]) -> list[bool]:
        """Each flag set on any rank, in one all-reduce (every rank then takes the same branch)."""
        if self.mesh is None:
            return [bool(f) for f in flags]
        t = torch.tensor([float(bool(f)) for f in flags], dtype=torch.float32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def max_over_ranks(self, value: float) -> float:
        """The largest of every rank's ``value`` (e.g. peak memory: the busiest pipeline stage's)."""
        if self.mesh is None:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def barrier(self) -> None:
        if self.mesh is not None:
            dist.barrier()


def init_runtime(cfg: RunConfig) -> Runtime:
    """One process, or the torchrun / Slurm world this process belongs to."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(cfg.trainer.device, int(os.environ.get("LOCAL_RANK", "0")))
    dims = ParallelDims.from_config(cfg.parallel, world)
    check_layout(cfg, dims, device.type)
    mesh = None
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            global _OWN_PROCESS_GROUP
            # a rank that stops answering fails every collective after parallel.timeout_s, not torch's 30 minutes
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(seconds=cfg.parallel.timeout_s))
            _OWN_PROCESS_GROUP = True
        mesh = dims.build_mesh(device.type)
    return Runtime(device=device, dims=dims, mesh=mesh, rank=rank)


def shutdown_runtime() -> None:
    """Destroy the process group ``init_runtime`` created (a no-op for one process, or for a group the
    embedding stack owns). Left to interpreter exit, the backend's worker threads can be torn down by
    static destructors while still joinable, and the rank aborts (``terminate called without an active
    exception``) after a run that finished."""
    global _OWN_PROCESS_GROUP
    if _OWN_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_PROCESS_GROUP = False


def check_layout(cfg: RunConfig, dims: ParallelDims, device_type: str = "cpu") -> None:
    """What can be refused from the config alone, before a process group or a model exists: a pipeline
    schedule that cannot run, a model with fewer layers than stages or heads that tp cannot split."""
    p = cfg.parallel
    if dims.pp > 1:
        check_schedule(p.pp_schedule, pp=dims.pp, chunks=p.pp_stages_per_rank, microbatches=cfg.trainer.grad_accum_steps)
        if device_type == "cuda" and p.pp_schedule == "interleaved_1f1b":
            raise LayoutError("pp_schedule=interleaved_1f1b over NCCL is not supported yet (its messages are matched by "
                              "tag, which NCCL ignores); use pp_schedule=1f1b or gpipe on GPUs")
    if cfg.model.architecture is not None:
        dims.check_model(cfg.model.architecture, stages=p.pp_stages_per_rank if dims.pp > 1 else 1)
