"""Model math (Llama-family decoder) and checkpoint interop."""

from .hf import load_hf_model, load_tokenizer, save_hf_model
from .transformer import KVCache, LayerSpec, RopeScaling, Transformer, TransformerConfig

__all__ = [
    "KVCache",
    "LayerSpec",
    "RopeScaling",
    "Transformer",
    "TransformerConfig",
    "load_hf_model",
    "load_tokenizer",
    "save_hf_model",
]
