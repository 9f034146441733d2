"""Sampling from the policy: batched generation over a KV cache."""

from .sampling import generate, sample_next

__all__ = ["generate", "sample_next"]
