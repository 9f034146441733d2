"""Parallel layouts applied from outside the model: ParallelDims, tensor/sequence parallel, activation
checkpointing, FSDP2, pipeline stages, sharded checkpoints, the runtime of a stage, the dry-run planner."""

from .activation_checkpoint import apply_activation_checkpointing
from .dims import LayoutError, ParallelDims
from .fsdp import apply_fsdp
from .tensor_parallel import apply_tensor_parallel

__all__ = ["LayoutError", "ParallelDims", "apply_activation_checkpointing", "apply_fsdp", "apply_tensor_parallel"]
