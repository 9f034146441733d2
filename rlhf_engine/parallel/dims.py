"""The process layout of a run: data-parallel replicate/shard, pipeline, tensor.

    dims = ParallelDims(dp_replicate=1, dp_shard=2, pp=1, tp=2, world_size=4)
    dims.check_model(model_config)          # before anything is allocated
    mesh = dims.build_mesh("cpu")           # DeviceMesh named ("pp", "dp_replicate", "dp_shard", "tp")

One object owns the mesh and is passed explicitly; nothing is kept in module globals. Tensor parallel
is the innermost dimension, so its ranks are neighbours (one node, fastest links); pipeline stages are
outermost. ``dp_shard = -1`` takes whatever the other degrees leave of the world size.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..faults import LayoutError
from ..models.transformer import TransformerConfig

__all__ = ["LayoutError", "MESH_DIMS", "ParallelDims"]

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    pp: int
    tp: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "pp", "tp", "world_size"):
            if getattr(self, name) < 1:
                raise LayoutError(f"{name}={getattr(self, name)} must be >= 1")
        others = self.dp_replicate * self.pp * self.tp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise LayoutError(
                    f"world size {self.world_size} is not divisible by dp_replicate*pp*tp = "
                    f"{self.dp_replicate}*{self.pp}*{self.tp} = {others}; change the world size or one of them"
                )
            object.__setattr__(self, "dp_shard", self.world_size // others)
        elif self.dp_shard < 1:
            raise LayoutError(f"dp_shard={self.dp_shard} must be >= 1 or -1 (fill)")
        product = others * self.dp_shard
        if product != self.world_size:
            raise LayoutError(
                f"dp_replicate*dp_shard*pp*tp = {self.dp_replicate}*{self.dp_shard}*{self.pp}*{self.tp} = "
                f"{product}, but the world size is {self.world_size}; make them equal (dp_shard=-1 fills)"
            )

    @classmethod
    def from_config(cls, parallel, world_size: int) -> "ParallelDims":
        """From the run config's ``parallel`` section."""
        return cls(parallel.dp_replicate, parallel.dp_shard, parallel.pp, parallel.tp, world_size)

    @property
    def dp(self) -> int:
        """Total data-parallel degree: how many different batches are processed at once."""
        return self.dp_replicate * self.dp_shard

    def check_model(self, cfg: TransformerConfig, stages: int = 1) -> None:
        """Refuse a model this layout cannot split, naming the numbers to change. ``stages``: pipeline
        stages per pp rank (interleaved); every stage needs a layer, layers need not divide evenly."""
        problems = []

        def need(value: int, what: str, by: int, by_name: str) -> None:
            if value % by:
                problems.append(f"{what}={value} is not divisible by {by_name}={by}")

        need(cfg.num_heads, "num_heads", self.tp, "tp")
        need(cfg.num_kv_heads, "num_kv_heads", self.tp, "tp")  # KV heads are split, never replicated
        need(cfg.intermediate_size, "intermediate_size", self.tp, "tp")
        need(cfg.vocab_size, "vocab_size", self.tp, "tp")
        if cfg.num_layers < self.pp * stages:
            problems.append(f"num_layers={cfg.num_layers} is fewer than the {self.pp * stages} pipeline stages "
                            f"(pp={self.pp} x pp_stages_per_rank={stages}): every stage needs a layer")
        if problems:
            raise LayoutError("layout does not fit the model: " + "; ".join(problems))

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The 4-D DeviceMesh; sub-meshes by name: mesh['tp'], mesh['dp_shard'], mesh['dp_replicate', 'dp_shard']."""
        return init_device_mesh(
            device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp), mesh_dim_names=MESH_DIMS
        )
