"""rlhf_kernels: fused LM-head kernels for RLHF (log-probs, entropy, exact KL, PPO loss, GAE).

Depends on torch and triton only, never on rlhf_engine, so other training stacks can use it alone.
The operations land here with their Triton and chunked-torch implementations and fp32 oracles.
"""

__version__ = "0.1.0"
