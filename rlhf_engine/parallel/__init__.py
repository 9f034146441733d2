"""Parallel layouts applied from outside the model: ParallelDims, tensor/sequence parallel, FSDP2."""

from .dims import LayoutError, ParallelDims
from .fsdp import apply_fsdp
from .tensor_parallel import apply_tensor_parallel

__all__ = ["LayoutError", "ParallelDims", "apply_fsdp", "apply_tensor_parallel"]
