"""The one-token decode step as one flat function over the model's weights (``rollout.sampling.generate``).

A decode step at rollout batch sizes is launch-bound: its GEMMs take a few microseconds each, and the
module path around them (a module call per norm and projection, a ``LayerContext`` per forward, rotary
tables and masks rebuilt by the trunk and again by the head) costs more than the arithmetic.

``DecodeProgram.build(model)`` reads a ``Transformer`` or a ``RoleModel`` (trunk + policy head) once, inside
``fused_projections``, into per-layer tuples; ``step`` then runs the math of the modules' forward on (B, D)
rows: q/k/v and gate/up fused, one rotary op over q and k (``apply_rope``'s products), q, k and v as views,
``attention_mask``, the layer's own attention function (SDPA with each key/value head's group of query heads
as its query rows; compiled, with caches of up to 256 slots, fp32 products and sums that inductor fuses),
``rms_norm``, and the residual adds accumulated
inside the o and down GEMMs (``Projection.add_to``; not in sandwich layers, where a norm comes between).
Rotary tables are computed once per generation for every position it can reach, and on a CPU every
projection and the LM head run on transposed copies (``Projection``). The step equals the module path up
to the rounding of those sums: within 1.1e-6 in fp32 over every model family in
``tests/models/test_transformer_hf_parity.py`` (Llama with biases and rope scaling, Mistral windows, Qwen2/3
with q/k norms, Gemma 2/3 with sandwich norms, softcaps, scaled embeddings and two rotary bases: hidden
states, logits and the cache's keys and values). In bf16 the two differ by bf16 rounding, and the flat
step is no further from the fp32 model's step than the module step is. ``generate`` with and without it
samples the same tokens (``tests/test_sampling.py``, a trunk + policy head recording the trunk's states).

``rollout.decode_mode=compiled`` puts ``step`` through inductor on a CPU (``rollout.sampling``).

``build`` returns None, and generation keeps the module path, wherever the flat step could differ from it:
a layer whose projections are not fused (LoRA adapters, FP8 or Transformer Engine modules, tensor-parallel
or FSDP shards), a module of another type in a layer's place (an activation-checkpoint wrapper, another
norm), or a forward hook on any decoding module (which the flat step would skip).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.nn.modules import module as _module

from .kv_cache import KVCache
from .roles import Role, RoleModel
from .transformer import (Attention, DecoderLayer, Projection, RMSNorm, SwiGLU, Transformer, attention_mask,
                          rms_norm, rope_cos_sin, rotate, sdpa_attention, softcap_logits)

Norm = Callable[[torch.Tensor], torch.Tensor]


class _Layer(NamedTuple):
    """One decoder layer's weights and settings, read once per generation."""

    index: int  # global layer index (the cache's)
    window: int | None
    theta: float  # rotary base (keys the rotary tables)
    input_norm: Norm
    post_attention_norm: Norm
    pre_feedforward_norm: Norm | None  # sandwich norms (Gemma 2/3), else None
    post_feedforward_norm: Norm | None
    qkv: Projection  # (D -> (h + 2 kvh) d)
    qkv_sizes: list[int]  # [h d, kvh d, kvh d]
    q_norm: Norm | None
    k_norm: Norm | None
    head_dim: int
    scale: float | None
    softcap: float | None
    attention: Callable[..., torch.Tensor]
    o_proj: Projection
    gate_up: Projection
    gate_up_sizes: list[int]
    act: Callable[[torch.Tensor], torch.Tensor]
    down_proj: Projection


def _norm(module: nn.Module) -> Norm:
    w, eps, offset = module.weight, module.eps, module.unit_offset
    return lambda x: rms_norm(x, w, eps, offset)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


class DecodeProgram:
    """The flat decode step of one model (see the module docstring). Build it inside ``fused_projections``."""

    def __init__(self, embedder: Transformer, layers: list[_Layer], final_norm: Norm, head: Projection,
                 trunk_layers: int, max_positions: int) -> None:
        self.embedder = embedder  # the slice holding the embedding: its ``embed`` scales as the model's does
        self.layers = layers
        self.final_norm = final_norm
        self.head = head  # LM head, D -> V
        self.softcap = embedder.config.final_logit_softcapping
        self.trunk_layers = trunk_layers  # the states after this many layers are the trunk's (0: no trunk)
        weight = embedder.embed_tokens.weight
        self.windows = list(dict.fromkeys(layer.window for layer in layers))
        positions = torch.arange(max_positions, device=weight.device)[None]  # (1, n)
        self.rope = {}  # theta -> ((n, d) cos, (n, d) signed sin), indexed by position at every step
        for layer in layers:
            if layer.theta not in self.rope:
                cos, sin = rope_cos_sin(embedder.inv_freq(weight.device, layer.index), positions, weight.dtype)
                self.rope[layer.theta] = (cos[0], sin[0])

    @classmethod
    def build(cls, model: nn.Module, max_positions: int) -> "DecodeProgram | None":
        """The program of ``model`` (a ``Transformer`` with embedding, layers, final norm and LM head, or a
        ``RoleModel``: trunk + policy head) for positions below ``max_positions``, or None where the flat
        step could differ from the modules."""
        if isinstance(model, RoleModel):
            head = model.head(Role.POLICY)
            parts = [model.trunk, head] if model.trunk is not None else [head]
            trunk_layers = model.trunk_layers if model.trunk is not None else 0
        elif isinstance(model, Transformer):
            head, parts, trunk_layers = model, [model], 0
        else:
            return None
        embedder = parts[0]
        if embedder.embed_tokens is None or head.norm is None or type(head.norm) is not RMSNorm:
            return None
        if type(embedder.embed_tokens) is not nn.Embedding:
            return None
        if head.lm_head is not None and type(head.lm_head) is not nn.Linear:
            return None
        if _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return None
        if any(_hooked(m) for part in parts for m in part.modules()):
            return None
        layers = []
        for part in parts:
            for layer in part.layers.values():
                entry = cls._layer(layer, model.config)
                if entry is None:
                    return None
                layers.append(entry)
        output = head.output_weight
        if type(output) not in (torch.Tensor, nn.Parameter):
            return None
        return cls(embedder, layers, _norm(head.norm), Projection.of(output, None), trunk_layers, max_positions)

    @staticmethod
    def _layer(layer: nn.Module, cfg) -> _Layer | None:
        if type(layer) is not DecoderLayer:
            return None
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not Attention or type(mlp) is not SwiGLU or attn.fused is None or mlp.fused is None:
            return None
        norms = [layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm, attn.k_norm]
        if layer.sandwich:
            norms += [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
        if any(n is not None and type(n) is not RMSNorm for n in norms):
            return None
        projections = [attn.o_proj, mlp.down_proj]
        if any(type(p) is not nn.Linear or type(p.weight) is not nn.Parameter for p in projections):
            return None
        i = attn.layer
        return _Layer(
            index=i, window=cfg.layer_window(i), theta=cfg.layer_theta(i)[0],
            input_norm=_norm(layer.input_layernorm),
            post_attention_norm=_norm(layer.post_attention_layernorm),
            pre_feedforward_norm=_norm(layer.pre_feedforward_layernorm) if layer.sandwich else None,
            post_feedforward_norm=_norm(layer.post_feedforward_layernorm) if layer.sandwich else None,
            qkv=attn.fused[0], qkv_sizes=attn.fused[1],
            q_norm=_norm(attn.q_norm) if attn.q_norm is not None else None,
            k_norm=_norm(attn.k_norm) if attn.k_norm is not None else None, head_dim=attn.head_dim,
            scale=attn.scale, softcap=attn.softcap, attention=attn.attention,
            o_proj=Projection.of(attn.o_proj.weight, attn.o_proj.bias), gate_up=mlp.fused[0],
            gate_up_sizes=mlp.fused[1], act=mlp.act, down_proj=Projection.of(mlp.down_proj.weight, mlp.down_proj.bias))

    def step(
        self,
        tokens: torch.Tensor,  # (B, 1)
        positions: torch.Tensor,  # (B, 1)
        document_ids: torch.Tensor,  # (B, 1)
        cache: KVCache,
        trunk_only: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One token per row through every layer, its keys and values written to ``cache``: (final hidden
        states (B, 1, D), the trunk's boundary states (B, 1, D), or None without a trunk). ``trunk_only``:
        through the trunk's layers only, (None, trunk states)."""
        x = self.embedder.embed(tokens)[:, 0]  # (B, D)
        q_slots, k_docs = cache.begin(document_ids)
        k_slots = torch.arange(k_docs.shape[1], device=tokens.device)
        masks = {w: attention_mask(q_slots, k_slots, document_ids, k_docs, w) for w in self.windows}  # (B, 1, 1, Sk)
        pos = positions[:, 0]  # (B,)
        rope = {theta: (cos[pos][:, None], sin[pos][:, None]) for theta, (cos, sin) in self.rope.items()}  # (B, 1, d)
        trunk = None
        for n, layer in enumerate(self.layers):
            if n == self.trunk_layers and n > 0:  # (a role head holds at least one layer)
                trunk = x[:, None]
                if trunk_only:
                    break
            out = self._attention(layer, layer.input_norm(x), *rope[layer.theta], masks[layer.window], cache)
            if layer.pre_feedforward_norm is not None:  # sandwich
                x = x + layer.post_attention_norm(layer.o_proj(out))
                x = x + layer.post_feedforward_norm(self._mlp(layer, layer.pre_feedforward_norm(x)))
            else:  # the residual adds inside the output GEMMs
                x = layer.o_proj.add_to(x, out)
                gate, up = layer.gate_up(layer.post_attention_norm(x)).split(layer.gate_up_sizes, dim=-1)
                x = layer.down_proj.add_to(x, layer.act(gate) * up)
        cache.commit()
        return (None if trunk_only else self.final_norm(x)[:, None]), trunk

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, D) final hidden states -> (B, V) fp32 logits (softcapped for Gemma 2), as ``full_logits``."""
        return softcap_logits(self.head(hidden).float(), self.softcap)

    @staticmethod
    def _attention(layer: _Layer, x: torch.Tensor, cos, sin, mask, cache: KVCache) -> torch.Tensor:
        """``Attention.forward`` (fused path) for one token per row, up to the output projection: (B, D) ->
        (B, h d). The rotary op is ``apply_rope``'s (``rotate``), on (B, heads, d) rows with (B, 1, d) tables."""
        B, d, sizes = x.shape[0], layer.head_dim, layer.qkv_sizes
        h, qk_end = sizes[0] // d, sizes[0] + sizes[1]
        qkv = layer.qkv(x)  # (B, (h + 2 kvh) d)
        if layer.q_norm is None:
            qk = qkv[:, :qk_end].view(B, -1, d)  # (B, h + kvh, d)
            qk = rotate(qk, cos, sin)
            q, k = qk[:, :h, None], qk[:, h:, None]  # (B, h, 1, d), (B, kvh, 1, d)
        else:
            q = layer.q_norm(qkv[:, : sizes[0]].view(B, -1, d))  # (B, h, d)
            k = layer.k_norm(qkv[:, sizes[0] : qk_end].view(B, -1, d))  # (B, kvh, d)
            q, k = rotate(q, cos, sin)[:, :, None], rotate(k, cos, sin)[:, :, None]  # (B, h | kvh, 1, d)
        v = qkv[:, qk_end:].view(B, -1, 1, d)  # (B, kvh, 1, d)
        k, v = cache.write(layer.index, k, v)  # (B, kvh, Sk, d)
        if layer.attention is sdpa_attention:
            # grouped-query heads as query rows: query head j reads key/value head j // g, so (B, h, 1, d) is
            # (B, kvh, g, d) in order, and the (B, 1, 1, Sk) mask is the same for every row. One attention
            # with g rows per key/value head instead of h with the heads repeated: 25-30% faster on a CPU.
            q = q.view(B, k.shape[1], -1, d)  # (B, kvh, g, d)
            if torch.compiler.is_compiling() and layer.softcap is None and k.shape[2] <= ONE_QUERY_MAX_SLOTS:
                out = _one_query_attention(q, k, v, mask, layer.scale if layer.scale is not None else d**-0.5)
                return out.reshape(B, -1)  # (B, h d)
        out = layer.attention(q, k, v, mask, scale=layer.scale, softcap=layer.softcap)  # (B, h, 1, d) or (B, kvh, g, d)
        return out.reshape(B, -1)  # (B, h d) (one query: (B, h, 1, d) is already (B, 1, h, d) in order)

    @staticmethod
    def _mlp(layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        """``SwiGLU.forward`` (fused path): (B, D) -> (B, D)."""
        gate, up = layer.gate_up(x).split(layer.gate_up_sizes, dim=-1)
        return layer.down_proj(layer.act(gate) * up)


ONE_QUERY_MAX_SLOTS = 256  # the compiled step's own attention up to this cache length, SDPA beyond


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """Attention of one query per row as broadcast products and sums in fp32, for the compiled step:
    softmax(q . k * scale, masked) . v with q (B, kvh, g, d), k/v (B, kvh, Sk, d), mask (B, 1, 1, Sk)
    -> (B, kvh, g, d). Inductor fuses it into two loops over the cache; inside the compiled bf16 step that
    took 38 against SDPA's 63 us a layer (batch 32, 2 x 2 heads, 64 slots, 2 CPU cores). Eagerly the
    materialized (B, kvh, g, Sk, d) products make it slower than SDPA, so only the compiled step uses it,
    and only up to ``ONE_QUERY_MAX_SLOTS`` cache slots (``bench_generate --modes compiled``, fp32, batch 16:
    generation 2-17% faster with caches of 64 to 256 slots, 2-4% slower with 512)."""
    scores = (q.float()[:, :, :, None] * k.float()[:, :, None]).sum(-1) * scale  # (B, kvh, g, Sk)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # (every row sees itself: none empty)
    return (probs[..., None] * v.float()[:, :, None]).sum(-2).to(q.dtype)  # (B, kvh, g, d)
