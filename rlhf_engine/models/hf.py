"""Hugging Face checkpoint interop: local directories in and out, no hub access.

A checkpoint directory holds ``config.json``, weights as ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, and optionally tokenizer files with a chat template. Supported:
LlamaForCausalLM (Llama 2 and 3.x), MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
Gemma2ForCausalLM and Gemma3ForCausalLM (text-only Gemma 3, model_type gemma3_text). A config field this engine does not implement
(another rope type, an activation other than SiLU, dropout...) fails loudly instead of loading a model
that computes something else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..data.reader import DataError
from .transformer import RopeScaling, Transformer, TransformerConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
GEMMA = ("gemma2", "gemma3_text")
_CLASSIFIERS = {"gemma3_text": "Gemma3TextForSequenceClassification"}  # Gemma3ForSequenceClassification is multimodal


def architecture(family: str, head: str = "ForCausalLM") -> str:
    """The Hugging Face class name of ``family`` with ``head`` (ForCausalLM, ForSequenceClassification)."""
    if head == "ForSequenceClassification" and family in _CLASSIFIERS:
        return _CLASSIFIERS[family]
    return ARCHITECTURES[family].removesuffix("ForCausalLM") + head
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_HF_PREFIX = "model."


class UnsupportedCheckpointError(ValueError):
    """The checkpoint's architecture or one of its config fields is not implemented here."""


def _require(ok: bool, path: Path | str, message: str) -> None:
    if not ok:
        raise UnsupportedCheckpointError(f"{path}: {message}")


def config_from_hf(hf: Any, source: Path | str = "<config>", *, head: str = "ForCausalLM") -> TransformerConfig:
    """Map a transformers Llama/Mistral/Qwen2/Qwen3/Gemma 2/Gemma 3 config object to ``TransformerConfig``.
    ``head``: the architecture suffix expected (``ForSequenceClassification`` for reward models)."""
    family = hf.model_type
    _require(family in ARCHITECTURES, source, f"model_type {family!r} is not supported; "
             f"supported: {', '.join(sorted(ARCHITECTURES))}")
    expected = architecture(family, head)
    archs = getattr(hf, "architectures", None) or [expected]
    _require(archs == [expected], source, f"architectures {archs} not supported; expected [{expected!r}]")
    gemma = family in GEMMA
    act = getattr(hf, "hidden_activation", None) if gemma else hf.hidden_act
    _require(act == ("gelu_pytorch_tanh" if gemma else "silu"), source,
             f"hidden activation {act!r} not supported (Gemma: 'gelu_pytorch_tanh', others: 'silu')")
    _require(not getattr(hf, "use_bidirectional_attention", False), source, "bidirectional attention is not supported")
    _require(not getattr(hf, "attention_dropout", 0.0), source, "attention_dropout > 0 is not supported")
    _require(getattr(hf, "pretraining_tp", 1) == 1, source, "pretraining_tp != 1 is not supported")

    rope = dict(getattr(hf, "rope_parameters", None) or {})
    local_theta = None
    if family == "gemma3_text":  # one rotary set per layer type: local (sliding) layers unscaled
        local = dict(rope.get("sliding_attention") or {})
        _require(local.get("rope_type", "default") == "default", source, "Gemma 3's local rope must be 'default'")
        local_theta = float(local.get("rope_theta", 10000.0))
        rope = dict(rope.get("full_attention") or {})
    rope_theta = rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    scaling = None
    if rope_type == "linear":
        scaling = RopeScaling(rope_type="linear", factor=rope["factor"])
    elif rope_type == "llama3":
        scaling = RopeScaling(
            rope_type="llama3",
            factor=rope["factor"],
            low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"],
        )
    else:
        _require(rope_type == "default", source,
                 f"rope_type {rope_type!r} is not supported (supported: default, linear, llama3)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedCheckpointError(f"{source}: partial_rotary_factor != 1 is not supported")

    qkv_bias = o_bias = bool(getattr(hf, "attention_bias", False))
    sliding_window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if family == "qwen2":
        qkv_bias, o_bias = True, False  # Qwen2 hard-codes biases on q/k/v only
    if family in ("qwen2", "qwen3"):
        if not getattr(hf, "use_sliding_window", False):
            sliding_window, layer_types = None, None
    elif family == "llama":
        sliding_window, layer_types = None, None
    elif gemma and sliding_window is None:
        layer_types = None
    if layer_types is not None and sliding_window is None:
        layer_types = None  # transformers writes ['full_attention', ...] even without a window
    return TransformerConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        rms_norm_eps=hf.rms_norm_eps,
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        qk_norm=family in ("qwen3", "gemma3_text"),
        hidden_act="gelu_tanh" if gemma else "silu",
        norm_unit_offset=gemma,
        sandwich_norms=gemma,
        scale_embeddings=gemma,
        query_pre_attn_scalar=float(hf.query_pre_attn_scalar) if gemma else None,
        attn_logit_softcapping=getattr(hf, "attn_logit_softcapping", None) if gemma else None,
        final_logit_softcapping=getattr(hf, "final_logit_softcapping", None) if gemma else None,
        rope_local_theta=local_theta,
        sliding_window=sliding_window,
        layer_types=list(layer_types) if layer_types is not None else None,
        initializer_range=getattr(hf, "initializer_range", 0.02),
        family=family,
    )


def config_to_hf(cfg: TransformerConfig, dtype: torch.dtype = torch.float32, **token_ids: Any):
    """A transformers config object for ``cfg`` (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config,
    Gemma2Config or Gemma3TextConfig)."""
    from transformers import (  # lazy: transformers is slow to import
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling is not None:
        rope.update(cfg.rope_scaling.__dict__)
        if cfg.rope_scaling.rope_type == "linear":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                rope.pop(key)
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
        architectures=[ARCHITECTURES[cfg.family]],
        dtype=str(dtype).removeprefix("torch."),
        **token_ids,
    )
    where = f"exporting as {ARCHITECTURES[cfg.family]}"
    _require(cfg.qk_norm == (cfg.family in ("qwen3", "gemma3_text")), where,
             "query/key norms are Qwen3's and Gemma 3's (family='qwen3' or 'gemma3_text') and only theirs")
    gemma = cfg.family in GEMMA
    _require((cfg.hidden_act == "gelu_tanh", cfg.norm_unit_offset, cfg.sandwich_norms, cfg.scale_embeddings) == (gemma,) * 4,
             where, "GeGLU, (1 + w) norms, sandwich norms and scaled embeddings come together, in Gemma only")
    _require(gemma or (cfg.query_pre_attn_scalar, cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (None,) * 3,
             where, "query_pre_attn_scalar and logit softcapping are Gemma's")
    _require(cfg.rope_local_theta is None or cfg.family == "gemma3_text", where, "rope_local_theta is Gemma 3's")
    sliding = cfg.sliding_window is not None
    kinds = cfg.layer_types or [("sliding_attention" if sliding else "full_attention")] * cfg.num_layers
    windows = dict(use_sliding_window=sliding, sliding_window=cfg.sliding_window, max_window_layers=cfg.num_layers,
                   layer_types=kinds)
    if gemma:
        common.pop("hidden_act")
        _require(cfg.qkv_bias == cfg.o_bias and not cfg.mlp_bias, where, "Gemma has one attention_bias for q/k/v/o")
        extra = dict(hidden_activation="gelu_pytorch_tanh", attention_bias=cfg.qkv_bias, sliding_window=cfg.sliding_window,
                     layer_types=kinds, query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar),
                     attn_logit_softcapping=cfg.attn_logit_softcapping,
                     final_logit_softcapping=cfg.final_logit_softcapping)
        if cfg.family == "gemma2":
            return Gemma2Config(**extra, **common)
        common["rope_parameters"] = {"full_attention": rope, "sliding_attention": {
            "rope_type": "default", "rope_theta": cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta}}
        return Gemma3TextConfig(**extra, **common)
    if cfg.family == "qwen3":
        _require(cfg.qkv_bias == cfg.o_bias and not cfg.mlp_bias, where,
                 "Qwen3 has one attention_bias for q/k/v/o and no MLP bias")
        return Qwen3Config(attention_bias=cfg.qkv_bias, **windows, **common)
    if cfg.family == "llama":
        _require(cfg.qkv_bias == cfg.o_bias, where, "Llama has one attention_bias for q/k/v/o; "
                 "set family='qwen2' for q/k/v-only biases")
        _require(cfg.sliding_window is None, where, "Llama has no sliding window; use family='mistral'")
        return LlamaConfig(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, **common)
    if cfg.family == "mistral":
        _require(not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias), where, "Mistral has no biases")
        _require(cfg.layer_types is None, where, "Mistral slides in every layer; use family='qwen2' for per-layer windows")
        return MistralConfig(sliding_window=cfg.sliding_window, **common)
    _require(cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias, where,
             "Qwen2 has biases on q/k/v and nowhere else")
    common.pop("head_dim")
    _require(cfg.head_dim == cfg.hidden_size // cfg.num_heads, where, "Qwen2 requires head_dim = hidden/heads")
    return Qwen2Config(**windows, **common)


def _int_if_whole(x: float | None) -> float | int | None:
    return int(x) if x is not None and float(x).is_integer() else x  # transformers' Gemma configs want an int


def _hf_to_ours(name: str) -> str:
    return name.removeprefix(_HF_PREFIX)


def _ours_to_hf(name: str) -> str:
    return name if name.startswith("lm_head.") else _HF_PREFIX + name


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / WEIGHTS_NAME
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found (only safetensors are read)")


def load_hf_model(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """Build a ``Transformer`` from a local HF checkpoint directory, weights cast to ``dtype``."""
    from transformers import AutoConfig  # lazy: transformers is slow to import

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such checkpoint directory (model.hf_path); give a local Hugging Face "
                        "checkpoint (config.json + safetensors), or model.architecture to start from scratch")
    if not (path / "config.json").exists():
        raise DataError(f"{path}: no config.json; expected a Hugging Face checkpoint directory")
    try:
        hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path / 'config.json'}: not a readable model config ({_first_line(exc)})") from None
    cfg = config_from_hf(hf_cfg, path / "config.json")
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for hf_name in f.keys():
                name = _hf_to_ours(hf_name)
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # some exporters write the tied copy too
                if name not in expected:
                    raise UnsupportedCheckpointError(f"{file}: unexpected tensor {hf_name!r}")
                state[name] = f.get_tensor(hf_name).to(dtype)
    missing = expected - set(state)
    if missing:
        raise UnsupportedCheckpointError(f"{path}: missing tensors {sorted(missing)[:5]} ({len(missing)} in all)")
    model.load_state_dict(state, strict=True, assign=True)
    return model


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a fresh directory beside ``path`` to fill; on success it replaces ``path`` by renames (the old
    one moved aside first, then removed), on failure it is deleted. A crash never leaves a half-written
    directory under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_hf_model(
    model: Transformer,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``model`` (and a tokenizer) as a directory ``transformers`` loads, atomically.

    The directory is assembled beside ``path`` and renamed into place, so a crash never leaves a
    half-written checkpoint under the final name; an existing ``path`` is replaced. Weights larger than
    ``max_shard_bytes`` are split into shards with a ``model.safetensors.index.json``.
    """
    path = Path(path)
    state = {
        _ours_to_hf(k): (v.to(dtype) if dtype else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    out_dtype = dtype or next(iter(state.values())).dtype
    token_ids = {}
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token_ids[key] = getattr(tokenizer, key, None)
    hf_cfg = config_to_hf(model.config, out_dtype, **token_ids)

    with atomic_directory(path) as tmp:
        hf_cfg.save_pretrained(tmp)
        _write_shards(state, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def _write_shards(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS_NAME), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer (with its chat template) saved in a checkpoint directory, via AutoTokenizer."""
    from transformers import AutoTokenizer  # lazy: transformers is slow to import

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such tokenizer directory (model.tokenizer_path or model.hf_path)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # e.g. a tokenizer.json without 'added_tokens'
        raise DataError(f"{path}: cannot load its tokenizer (tokenizer.json / tokenizer_config.json: "
                        f"{_first_line(exc)}); re-save it with transformers' save_pretrained") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
