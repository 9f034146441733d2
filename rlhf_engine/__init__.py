"""rlhf-engine: a Megatron-style RLHF training engine (SFT, reward models, PPO and relatives)."""

__version__ = "0.1.0"
