"""Schema of the model: the decoder's shape (``TransformerConfig``) and which model a run starts from.

Pure data (pydantic dataclasses, no torch), so configs load and validate without importing the model
code. ``section`` is the decorator every config section uses: keyword-only fields, unknown keys refused.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

_STRICT = ConfigDict(extra="forbid")
section = dataclass(kw_only=True, config=_STRICT)


@section
class RopeScaling:
    """Rotary frequency scaling for long context.

    ``linear``: inv_freq / factor (position interpolation, Chen et al. 2023).
    ``llama3``: Llama 3.1's piecewise rule: wavelengths above original_max / low_freq_factor are
    divided by ``factor``, those below original_max / high_freq_factor kept, and a smooth blend between.
    """

    rope_type: Literal["linear", "llama3"]
    """Which rule to apply."""
    factor: float
    """Context extension factor."""
    low_freq_factor: float = 1.0
    """llama3 only: wavelengths longer than original_max_position_embeddings / low_freq_factor are scaled."""
    high_freq_factor: float = 4.0
    """llama3 only: wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """llama3 only: the context length the model was pretrained at."""


@section
class TransformerConfig:
    """Shape and numerics of a Llama-family decoder."""

    vocab_size: int
    """Number of token embeddings (and LM-head rows)."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU feed-forward layer."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Number of query heads."""
    num_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention); None means num_heads; 1 is multi-query."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_heads."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside RMSNorm's square root."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    rope_scaling: RopeScaling | None = None
    """Optional rotary frequency scaling."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is meant for (recorded in exported configs)."""
    tie_word_embeddings: bool = False
    """Share the LM-head weight with the token embedding."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2; Llama's attention_bias sets this and o_bias)."""
    o_bias: bool = False
    """Bias on the attention output projection."""
    mlp_bias: bool = False
    """Bias on the three feed-forward projections."""
    qk_norm: bool = False
    """RMSNorm over each head's query and key (head_dim wide, shared by the heads) before the rotary
    embedding (Qwen3, Gemma 3)."""
    hidden_act: Literal["silu", "gelu_tanh"] = "silu"
    """Gate activation of the feed-forward layer: SwiGLU (silu) or GeGLU with tanh-approximated GELU (Gemma)."""
    norm_unit_offset: bool = False
    """RMSNorm scales by (1 + w), w stored zero-initialised, and multiplies before casting back (Gemma)."""
    sandwich_norms: bool = False
    """Gemma 2/3's block: x + post_attn_norm(attn(input_norm(x))), then h + post_ff_norm(mlp(pre_ff_norm(h)))
    (the post_attention_layernorm then normalises the attention output, as in Hugging Face's Gemma)."""
    scale_embeddings: bool = False
    """Multiply the token embeddings by sqrt(hidden_size), rounded to the compute dtype (Gemma)."""
    query_pre_attn_scalar: float | None = None
    """Attention scores are scaled by query_pre_attn_scalar^-1/2 instead of head_dim^-1/2 (Gemma)."""
    attn_logit_softcapping: float | None = None
    """Attention scores become cap * tanh(score / cap) before the mask and softmax (Gemma 2: 50)."""
    final_logit_softcapping: float | None = None
    """Output logits become cap * tanh(logit / cap), inside the fused log-prob kernels (Gemma 2: 30)."""
    rope_local_theta: float | None = None
    """Rotary base of the sliding-window layers, which then take no rope_scaling (Gemma 3: 10000, while
    rope_theta and rope_scaling apply to the global layers)."""
    sliding_window: int | None = None
    """Keys further than this many tokens back are invisible in 'sliding_attention' layers."""
    layer_types: list[Literal["full_attention", "sliding_attention"]] | None = None
    """Per-layer attention kind; None means every layer slides when sliding_window is set, else full."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of linear and embedding weights."""
    family: Literal["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"] = "llama"
    """Hugging Face architecture this model exports as (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
    Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM)."""

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                    "set head_dim explicitly or change one of them"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_layers={self.num_layers}"
            )
        if self.sliding_window is None and self.layer_types and "sliding_attention" in self.layer_types:
            raise ValueError("layer_types contains 'sliding_attention' but sliding_window is not set")

    def layer_theta(self, layer: int) -> tuple[float, "RopeScaling | None"]:
        """Rotary base and scaling of ``layer``: Gemma 3's sliding layers have their own base, unscaled."""
        if self.rope_local_theta is not None and self.layer_window(layer) is not None:
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None


@section
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021) instead of full fine-tuning: y = x W^T + (alpha / rank) x A^T B^T
    with W frozen, A (rank, in) Kaiming-uniform and B (out, rank) zero at the start (PEFT's defaults)."""

    rank: int = 0
    """Adapter rank r; 0 trains the full weights (no adapters)."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    target_modules: list[str] = dataclasses.field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Linear layers that get adapters: a module's last name component (``q_proj``), or a regular
    expression over its whole name (``layers\\.[0-9]+\\.mlp\\..*``). Add ``lm_head`` to adapt the LM head too
    (the fused log-prob kernels then read W + (alpha / r) B A); score heads never get adapters."""
    trainable: list[str] = dataclasses.field(default_factory=lambda: ["score"])
    """Modules that train in full beside the adapters (PEFT's modules_to_save): by default a reward
    model's or critic's score head."""
    export_peft: bool = False
    """Besides the merged Hugging Face export (``hf/``), write the adapters in PEFT's format (``peft/``:
    adapter_config.json + adapter_model.safetensors) over the run's base checkpoint (model.hf_path)."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError("rank must be >= 0 (0: no adapters)")
        if self.rank and not self.target_modules:
            raise ValueError("target_modules is empty: no layer would get an adapter")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")


@section
class ModelConfig:
    """Which model to train: a local Hugging Face checkpoint, or an architecture built from scratch."""

    hf_path: str | None = None
    """Local HF checkpoint directory (config.json, safetensors, tokenizer with chat template)."""
    architecture: TransformerConfig | None = None
    """Decoder shape for a model initialised from scratch (exclusive with hf_path)."""
    tokenizer_path: str | None = None
    """Tokenizer directory; default: hf_path, or for a scratch model a byte-level BPE trained on the data."""
    trunk_layers: int | Literal["auto"] = 0
    """RL roles share a frozen trunk of the embedding and this many lower layers (Sparrow: 64 of 80);
    each role owns the layers above. 0: four separate models. ``auto`` (rm, rl): the cut that
    ``rlhf-engine probe`` recommends (rm probes its own preference rows; rl takes the reward model's cut)."""
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    """Train low-rank adapters instead of full weights (sft, rm, dpo, rl: the policy and critic heads; the
    reference is then the policy with its adapters off)."""

    def __post_init__(self) -> None:
        if (self.hf_path is None) == (self.architecture is None):
            raise ValueError("set exactly one of model.hf_path and model.architecture")
        if self.trunk_layers == "auto":
            return
        if self.trunk_layers < 0:
            raise ValueError("trunk_layers must be >= 0 (or auto)")
        if self.architecture is not None and self.trunk_layers >= self.architecture.num_layers:
            raise ValueError(f"trunk_layers={self.trunk_layers} must be below num_layers={self.architecture.num_layers}: "
                             "every role needs at least one layer of its own")
