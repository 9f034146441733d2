"""Llama-family decoder: the math only (no parallelism, no precision policy, no backends).

Covers Llama 2/3.x, Mistral, Qwen2, Qwen3 and Gemma 2/3 checkpoints: RMSNorm (Gemma's (1 + w) form too),
rotary embeddings (rope_theta, linear and Llama-3 frequency scaling, a separate base for Gemma 3's local
layers), SwiGLU or GeGLU, grouped- and multi-query attention, tied or untied embeddings (scaled by
sqrt(D) in Gemma), optional attention biases (Qwen2 puts them on q/k/v only), per-head query/key RMSNorm
(Qwen3, Gemma 3), Gemma's sandwich norms, query_pre_attn_scalar and attention/final logit softcapping,
sliding-window attention per layer.

Inputs may be *packed*: several documents per row, marked by ``document_ids``; attention is causal
within a document and positions restart at 0 for each one. A ``KVCache`` turns the same forward into
incremental decoding. The model returns final hidden states; turning them into log-probs without
materializing [N, V] logits is the job of ``rlhf_kernels`` (``logits()`` exists for tests and tiny
models).

Parallelism (``rlhf_engine.parallel``) and precision/backends (Transformer Engine, flash-attn) are
applied from outside: the submodules that change are named by ``LayerSpec``, not by branches here.
Module names follow Hugging Face's (``self_attn.q_proj``, ``mlp.gate_proj``...) minus the ``model.``
prefix, so checkpoint interop is a rename of one prefix.
"""

from __future__ import annotations

import contextlib

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard
from rlhf_kernels import LogprobOutput, linear_logprob
from torch import nn

from ..config.model import RopeScaling, TransformerConfig
from .kv_cache import KVCache

__all__ = ["KVCache", "LayerContext", "LayerSpec", "RopeScaling", "Transformer", "TransformerConfig"]

# ----------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back (Zhang & Sennrich 2019).
    ``unit_offset`` (Gemma): y = (1 + w) * x / sqrt(...), w starting at 0, multiplied in fp32 before the cast."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.unit_offset)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """``RMSNorm``'s math as a function (the flat decode step, ``models.decode``, calls it directly)."""
    dtype = x.dtype
    if not unit_offset and dtype == torch.float32 and _plain(x) and _plain(weight) and weight.dtype == torch.float32:
        # torch's fused kernel: one op instead of six (decode steps are launch-bound), and bit-identical
        # in fp32 to the lines below, forward and backward (measured over widths 16-4096)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (x32 * (1.0 + weight.float())).to(dtype)
    return weight * x32.to(dtype)


def _plain(t: torch.Tensor) -> bool:
    """A plain tensor or parameter (not a DTensor shard, FP8 or other tensor subclass)."""
    return type(t) is torch.Tensor or type(t) is nn.Parameter


def make_norm(spec: "LayerSpec", cfg: TransformerConfig, dim: int) -> nn.Module:
    """The configured RMSNorm over ``dim`` through the layer spec (Gemma's (1 + w) form when asked)."""
    if cfg.norm_unit_offset:
        return spec.norm(dim, eps=cfg.rms_norm_eps, unit_offset=True)
    return spec.norm(dim, eps=cfg.rms_norm_eps)


def rope_inv_freq(head_dim: int, theta: float, sc: RopeScaling | None) -> torch.Tensor:
    """Rotary inverse frequencies theta^(-2i/d), i < d/2, with the given scaling. (d/2,) fp32."""
    d = head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if sc is None:
        return inv_freq
    if sc.rope_type == "linear":
        return inv_freq / sc.factor
    # llama3: scale long wavelengths, keep short ones, interpolate smoothly in between.
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor
    )
    blended = (1 - smooth) * scaled / sc.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for ``positions`` (B, S): cos and *signed* sin, two (B, S, head_dim) tensors computed
    in fp32. The signed sin has its first half negated, so that rotate_half(x) * sin, with rotate_half(x) =
    (-x2, x1), is x.roll(d/2) * signed sin: the same products exactly, one op fewer (``apply_rope``)."""
    freqs = positions[..., None].float() * inv_freq.float()  # (B, S, d/2)
    cos, sin = freqs.cos(), freqs.sin()  # (B, S, d/2) each
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)  # (B, S, d) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, S, h, d) by the half-split convention (Su et al. 2021, as Llama):
    x * cos + rotate_half(x) * sin = x * cos + x.roll(d/2) * signed_sin (``rope_cos_sin``)."""
    return rotate(x, cos[:, :, None], signed_sin[:, :, None])  # tables (B, S, 1, d)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``apply_rope``'s products on any layout: x (..., d) with tables broadcast to it."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Projection(NamedTuple):
    """x (..., K) -> x W^T + b (..., M) over a copy of W made for generation (``fused_projections``,
    ``models.decode``). On a CPU the copy is transposed, (K, M) contiguous: MKL's GEMM at decode shapes runs
    1.4-2x faster on that layout than on the (M, K) weight that ``F.linear`` passes as a transposed view
    (measured at the quickstart model's shapes, with equal results). Elsewhere the weight is used as it is."""

    weight: torch.Tensor  # (K, M) on a CPU, else (M, K)
    bias: torch.Tensor | None
    transposed: bool

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Projection":
        if weight.device.type == "cpu":
            return cls(weight.detach().t().contiguous(), bias, True)
        return cls(weight, bias, False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., M)
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (N, K)
        y = torch.mm(x2, self.weight) if self.bias is None else torch.addmm(self.bias, x2, self.weight)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + self(x) for (N, K) rows, as one GEMM that accumulates into the residual where it can
        (no bias, transposed weight): equal up to the rounding of that one sum."""
        if self.transposed and self.bias is None and x.dim() == 2:
            return torch.addmm(residual, x, self.weight)
        return residual + self(x)


AttentionFn = Callable[..., torch.Tensor]  # (q, k, v, mask, *, scale=None, softcap=None) -> (B, h, S, d)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
    scale: float | None = None, softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention. q (B, h, S, d), k/v (B, kvh, Sk, d), mask (B, 1, S, Sk) boolean (True = visible)
    or None for plain causal attention with S == Sk; ``scale`` defaults to d^-1/2. Through torch SDPA,
    except with ``softcap`` (Gemma 2: scores become cap * tanh(score / cap) before the mask), which SDPA
    cannot express: then the scores are materialized, softmax in fp32. On a CPU, bf16/fp16 attention that
    will be differentiated runs in fp32 and is cast back: torch's CPU flash-attention backward is about 4x
    slower in bf16 than in fp32 (9.8 against 2.2 ms forward + backward at 32 x 4 heads x 42 tokens x 64)."""
    if softcap is None:
        dtype = q.dtype
        if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled():
            q, k, v = q.float(), k.float(), v.float()
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=q.shape[1] != k.shape[1], scale=scale,
        ).to(dtype)
    if k.shape[1] != q.shape[1]:  # grouped-query: each key/value head serves h / kvh query heads
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap  # (B, h, S, Sk)
    if mask is None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~mask, float("-inf")).float().softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


@dataclass(frozen=True)
class LayerSpec:
    """The submodules a backend may swap (Transformer Engine linears, flash-attn) without touching the math."""

    linear: Callable[..., nn.Module] = nn.Linear
    norm: Callable[..., nn.Module] = RMSNorm
    attention: AttentionFn = field(default=sdpa_attention)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int, spec: LayerSpec) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = spec.linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = spec.linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = spec.linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = spec.linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        # Qwen3, Gemma 3: one RMSNorm over head_dim, applied to every query (key) head before the rotary embedding
        self.q_norm = make_norm(spec, cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = make_norm(spec, cfg, cfg.head_dim) if cfg.qk_norm else None
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar is not None else None
        self.softcap = cfg.attn_logit_softcapping
        self.attention = spec.attention
        self.fused: tuple[Projection, list[int]] | None = None  # see fused_projections

    def forward(
        self,
        x: torch.Tensor,  # (B, S, D)
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        # Head counts come from the weights, so a tensor-parallel shard (fewer heads) works unchanged.
        d = self.head_dim
        if self.fused is not None and self.q_norm is None:  # one GEMM for q, k and v, one rotary op for q and k
            sizes = self.fused[1]  # [h d, kvh d, kvh d]
            qkv = self.fused[0](x)  # (B, S, (h + 2 kvh) d)
            qk = apply_rope(qkv[..., : sizes[0] + sizes[1]].view(B, S, -1, d), cos, sin)  # (B, S, h + kvh, d)
            q, k = qk.split([sizes[0] // d, sizes[1] // d], dim=2)
            v = qkv[..., sizes[0] + sizes[1]:]
        else:
            if self.fused is not None:
                q, k, v = self.fused[0](x).split(self.fused[1], dim=-1)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q.view(B, S, -1, d)  # (B, S, h, d)
            k = k.view(B, S, -1, d)  # (B, S, kvh, d)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, h, S, d), (B, kvh, S, d)
        v = v.reshape(B, S, -1, d).transpose(1, 2)  # (B, kvh, S, d)
        if cache is not None:
            k, v = cache.write(self.layer, k, v)  # (B, kvh, Sk, d) including the past
        out = self.attention(q, k, v, mask, scale=self.scale, softcap=self.softcap)  # (B, h, S, d)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)) (Shazeer 2020): SwiGLU with silu, GeGLU with tanh-approximated GELU (Gemma)."""

    def __init__(self, cfg: TransformerConfig, spec: LayerSpec) -> None:
        super().__init__()
        self.act = F.silu if cfg.hidden_act == "silu" else partial(F.gelu, approximate="tanh")
        self.gate_proj = spec.linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = spec.linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = spec.linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.fused: tuple[Projection, list[int]] | None = None  # see fused_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:  # one GEMM for gate and up (inside fused_projections)
            gate, up = self.fused[0](x).split(self.fused[1], dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _fusable(linears: list[nn.Module]) -> bool:
    """Plain nn.Linear with plain tensors (not LoRA wrappers, Transformer Engine or FP8 modules, DTensor
    shards, or meta tensors), all of one dtype and device."""
    weights = [m.weight for m in linears]
    return (all(type(m) is nn.Linear for m in linears) and all(_plain(w) for w in weights)
            and not any(w.is_meta for w in weights) and len({(w.dtype, w.device) for w in weights}) == 1)


@contextlib.contextmanager
def fused_projections(*modules: nn.Module | None):
    """Within the block, every attention layer computes q, k and v with one GEMM over their concatenated
    weights, and every feed-forward layer gate and up with one, instead of three and two (generation's
    decode steps are launch-bound at small batch). The concatenated copies (``Projection``: transposed on a
    CPU, whose GEMM is faster on that layout) are made on entry (so
    they reflect the weights as they are then; do not train inside) and dropped on exit; parameters,
    state dicts and exports keep the Hugging Face layout. Layers whose projections are not plain
    ``nn.Linear`` with plain tensors (LoRA, FP8 or Transformer Engine modules, tensor-parallel shards)
    keep their separate projections."""
    fused = []
    with torch.no_grad():
        for m in (m for root in modules if root is not None for m in root.modules()):
            parts = ([m.q_proj, m.k_proj, m.v_proj] if isinstance(m, Attention) else
                     [m.gate_proj, m.up_proj] if isinstance(m, SwiGLU) else None)
            if parts is None or not _fusable(parts):
                continue
            biases = [p.bias for p in parts]
            bias = torch.cat(biases) if all(b is not None for b in biases) else None
            if bias is None and any(b is not None for b in biases):
                continue
            m.fused = (Projection.of(torch.cat([p.weight for p in parts]), bias), [p.weight.shape[0] for p in parts])
            fused.append(m)
    try:
        yield
    finally:
        for m in fused:
            m.fused = None


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)) (Hugging Face's Llama names the second norm
    post_attention_layernorm). With ``sandwich_norms`` (Gemma 2/3): x + post_attention_layernorm(attn(
    input_layernorm(x))), then h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))."""

    def __init__(self, cfg: TransformerConfig, layer: int, spec: LayerSpec) -> None:
        super().__init__()
        self.input_layernorm = make_norm(spec, cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg, layer, spec)
        self.post_attention_layernorm = make_norm(spec, cfg, cfg.hidden_size)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = make_norm(spec, cfg, cfg.hidden_size)
            self.post_feedforward_layernorm = make_norm(spec, cfg, cfg.hidden_size)
        self.mlp = SwiGLU(cfg, spec)

    def forward(self, x, cos, sin, mask, cache):
        if self.sandwich:
            h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


# ----------------------------------------------------------------------------------------------
# Masks, positions and the KV cache


def attention_mask(
    q_slots: torch.Tensor,  # (S,) index of each query in the (cached) sequence
    k_slots: torch.Tensor,  # (Sk,)
    q_docs: torch.Tensor,  # (B, S) document id of each query
    k_docs: torch.Tensor,  # (B, Sk)
    window: int | None,
) -> torch.Tensor:
    """Boolean (B, 1, S, Sk) mask, True = visible: causal, same document, within the window.

    Every query sees at least itself, so no softmax row is empty (padding is a document of its own).
    """
    visible = k_slots[None, :] <= q_slots[:, None]  # (S, Sk)
    if window is not None:
        visible = visible & (q_slots[:, None] - k_slots[None, :] < window)
    return (visible[None] & (q_docs[:, :, None] == k_docs[:, None, :]))[:, None]


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at each document boundary of a packed row. (B, S) -> (B, S).

    A document is a maximal run of equal ids; ids need not be sorted or unique across rows.
    """
    B, S = document_ids.shape
    idx = torch.arange(S, device=document_ids.device).expand(B, S)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


@dataclass
class LayerContext:
    """What every decoder layer of one forward shares: rotary tables (B, S, d) per rotary base (one, or
    Gemma 3's global and local), masks per window, the cache."""

    rope: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer -> (cos, sin)
    masks: Callable[[int | None], torch.Tensor | None]
    kv_cache: KVCache | None = None


def softcap_logits(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap) (Gemma 2's final logit softcapping), or the logits unchanged."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def local_vocab_shard(weight: torch.Tensor) -> tuple[torch.Tensor, int, "torch.distributed.ProcessGroup | None"]:
    """(rows this rank holds, their offset in the vocabulary, tensor-parallel group or None) of an
    LM-head weight: the weight itself when not sharded, the local shard of a vocab-sharded DTensor."""
    if not isinstance(weight, DTensor):
        return weight, 0, None
    (placement,) = weight.placements
    local = weight.to_local()
    if not isinstance(placement, Shard) or placement.dim != 0 or weight.device_mesh.size() == 1:
        return (weight.full_tensor() if isinstance(placement, Shard) else local), 0, None
    if weight.shape[0] % weight.device_mesh.size():
        raise ValueError(f"vocabulary {weight.shape[0]} is not divisible by tp={weight.device_mesh.size()}")
    return local, weight.device_mesh.get_local_rank() * local.shape[0], weight.device_mesh.get_group()


# ----------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    """Token embedding -> decoder layers -> final RMSNorm; ``output_weight`` is the LM head.

    ``layers`` is keyed by global layer index, so a pipeline stage (``parallel.pipeline``), which holds
    a slice of the layers and the embedding only if first and the norm and head only if last, keeps
    the full model's parameter names.
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        spec: LayerSpec = LayerSpec(),
        *,
        layers: range | None = None,
        embedding: bool = True,
        final_norm: bool = True,
        lm_head: bool = True,
    ) -> None:
        """The whole decoder by default; a slice (``layers``, without ``embedding`` or ``final_norm``/``lm_head``)
        for the frozen trunk and the role heads (``models.roles``)."""
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if embedding else None
        layers = range(cfg.num_layers) if layers is None else layers
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, spec) for i in layers})
        self.norm = make_norm(spec, cfg, cfg.hidden_size) if final_norm else None
        untied = lm_head and not (cfg.tie_word_embeddings and embedding)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if untied else None
        # Rotary frequencies: fp32 per device, outside the state dict and out of reach of .to(dtype),
        # which would round a buffer to bf16.
        self._inv_freq: dict[tuple[torch.device, float], torch.Tensor] = {}

    def inv_freq(self, device: torch.device, layer: int = 0) -> torch.Tensor:
        """(d/2,) rotary inverse frequencies of ``layer`` (all layers share them but in Gemma 3)."""
        theta, scaling = self.config.layer_theta(layer)
        key = (device, theta)
        if key not in self._inv_freq:
            self._inv_freq[key] = rope_inv_freq(self.config.head_dim, theta, scaling).to(device)
        return self._inv_freq[key]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, S, D), times sqrt(D) rounded to their dtype with ``scale_embeddings`` (Gemma)."""
        x = self.embed_tokens(input_ids)
        if self.config.scale_embeddings:
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        return x

    @property
    def output_weight(self) -> torch.Tensor:
        """LM-head weight (V, D): the embedding itself when tied."""
        if self.lm_head is None and self.embed_tokens is None:
            raise AttributeError("this slice of the decoder has no LM head")
        if self.lm_head is None:
            return self.embed_tokens.weight
        merged = getattr(self.lm_head, "merged_weight", None)  # a LoRA-adapted head (models/lora.py)
        return merged() if merged is not None else self.lm_head.weight

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit norms (Llama's initialisation)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:  # unit scale: w = 1, or w = 0 in Gemma's (1 + w) form
                nn.init.zeros_(p) if self.config.norm_unit_offset else nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, S) tokens; (B, S, D) hidden states on a slice without the embedding
        *,
        positions: torch.Tensor | None = None,  # (B, S); default: restart per document / continue cache
        document_ids: torch.Tensor | None = None,  # (B, S); packed rows or padding
        kv_cache: KVCache | None = None,
        targets: torch.Tensor | None = None,  # (B, S) next-token ids, -100 where ignored
        temperature: float = 1.0,
    ) -> torch.Tensor | LogprobOutput:
        """Final hidden states (B, S, D) after the last RMSNorm; with ``targets``, per-token log-probs
        and entropy (B, S) through rlhf_kernels instead, without materializing logits.

        The log-probs are computed inside forward so that wrappers that gather parameters around
        forward (FSDP2) hold the LM head while it is used; under tensor parallelism the local
        vocabulary shard, its offset and the group come from the sharded weight.
        """
        x = self.embed(input_ids) if self.embed_tokens is not None else input_ids  # (B, S, D)
        ctx = self.layer_context(x, shape_of=input_ids, positions=positions, document_ids=document_ids,
                                 kv_cache=kv_cache)
        x = self.run_layers(x, ctx)
        if self.norm is None:  # a trunk: hand the residual stream on
            return x  # (the slice that ends the decoder commits the cache step: trunk and head share one)
        return self.finish(x, kv_cache=kv_cache, targets=targets, temperature=temperature)

    def stage_forward(
        self,
        x: torch.Tensor,  # (B, S) tokens on the first stage, else (B, S, D) (S / tp under sequence parallelism)
        layers: Sequence[int],  # this stage's layer indices
        *,
        first: bool,
        last: bool,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor | LogprobOutput:
        """One pipeline stage's share of ``forward`` (``parallel/pipeline.py``): the embedding if
        ``first``, ``layers``, and the final norm and output if ``last``; the same pieces as forward,
        so a stage computes exactly what the whole model computes there."""
        if first:
            x = self.embed(x)
        ctx = self.layer_context(x, positions=positions, document_ids=document_ids)
        x = self.run_layers(x, ctx, layers)
        return self.finish(x, targets=targets, temperature=temperature) if last else x

    def layer_context(
        self,
        x: torch.Tensor,  # (B, S, D) the layers' input
        *,
        shape_of: torch.Tensor | None = None,  # the tokens, whose (B, S) is the sequence's (x may be S / tp)
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> "LayerContext":
        """Rotary tables and masks shared by every layer of one forward.

        Under sequence parallelism a layer's input holds S / tp tokens; rotary tables and masks are for
        the whole sequence, whose length ``positions``/``document_ids`` (or the tokens) carry."""
        full = next((t for t in (positions, document_ids, shape_of) if t is not None), x)
        B, S = full.shape[:2]
        masks = self._mask_builder(B, S, x.device, document_ids, kv_cache)
        if positions is None:
            if kv_cache is not None:
                start = kv_cache.filled if kv_cache.static else kv_cache.length
                positions = (start + torch.arange(S, device=x.device)).expand(B, S)
            elif document_ids is not None:
                positions = document_positions(document_ids)
            else:
                positions = torch.arange(S, device=x.device).expand(B, S)
        tables: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

        def rope(layer: int) -> tuple[torch.Tensor, torch.Tensor]:  # (B, S, d) each, built once per base
            theta = self.config.layer_theta(layer)[0]
            if theta not in tables:
                tables[theta] = rope_cos_sin(self.inv_freq(x.device, layer), positions, x.dtype)
            return tables[theta]

        return LayerContext(rope, masks, kv_cache)

    def run_layers(self, x: torch.Tensor, ctx: "LayerContext", layers: Sequence[int] | None = None) -> torch.Tensor:
        """The residual stream (B, S, D) through ``layers`` (global indices; default: all this slice holds)."""
        for index in (self.layers if layers is None else map(str, layers)):
            i = int(index)
            x = self.layers[index](x, *ctx.rope(i), ctx.masks(self.config.layer_window(i)), ctx.kv_cache)
        return x

    def finish(
        self, x: torch.Tensor, *, kv_cache: KVCache | None = None, targets: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor | LogprobOutput:
        """Final norm (committing a decode step), then hidden states or, with ``targets``, log-probs."""
        if kv_cache is not None:
            kv_cache.commit()
        hidden = self.norm(x)
        if targets is None:
            return hidden
        weight, offset, group = local_vocab_shard(self.output_weight)
        return linear_logprob(hidden, weight, targets, temperature=temperature, tp_group=group, vocab_offset=offset,
                              softcap=self.config.final_logit_softcapping)

    def _mask_builder(self, B, S, device, document_ids, kv_cache) -> Callable[[int | None], torch.Tensor | None]:
        """Returns window -> mask, building each distinct mask once per forward."""
        docs = document_ids if document_ids is not None else torch.zeros(B, S, dtype=torch.long, device=device)
        if kv_cache is not None:
            q_slots, k_docs = kv_cache.begin(docs)
        else:
            q_slots, k_docs = torch.arange(S, device=device), docs
        k_slots = torch.arange(k_docs.shape[1], device=device)
        plain_causal = kv_cache is None and document_ids is None
        built: dict[int | None, torch.Tensor | None] = {}

        def mask(window: int | None) -> torch.Tensor | None:
            if plain_causal and (window is None or window >= S):
                return None  # SDPA's own causal path: no (S, S) mask in memory
            if window not in built:
                built[window] = attention_mask(q_slots, k_slots, docs, k_docs, window)
            return built[window]

        return mask

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Materialized logits (..., V). For tests, generation of tiny models and oracles only:
        training and scoring go through rlhf_kernels, which never builds this tensor."""
        return softcap_logits(F.linear(hidden, self.output_weight), self.config.final_logit_softcapping)
