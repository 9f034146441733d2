"""Model math (Llama-family decoder) and checkpoint interop."""

from .hf import load_hf_model, load_tokenizer, save_hf_model
from .roles import Role, RoleModel, RoleOutput, TrunkCache, load_roles, save_roles
from .transformer import KVCache, LayerSpec, RopeScaling, Transformer, TransformerConfig

__all__ = [
    "KVCache",
    "LayerSpec",
    "Role",
    "RoleModel",
    "RoleOutput",
    "RopeScaling",
    "Transformer",
    "TransformerConfig",
    "TrunkCache",
    "load_hf_model",
    "load_roles",
    "load_tokenizer",
    "save_hf_model",
    "save_roles",
]
