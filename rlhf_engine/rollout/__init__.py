"""Sampling from the policy: batched generation over a KV cache."""

from .sampling import Generation, generate, sample_next

__all__ = ["Generation", "generate", "sample_next"]
