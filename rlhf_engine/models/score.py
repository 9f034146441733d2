"""Score models: reward, preference and rule-violation models over a frozen SFT trunk.

    rm = ScoreModel.from_lm(sft_model, trunk_layers=k, num_outputs=1)
    scores = rm(input_ids, document_ids=docs)         # (B, S, num_outputs), fp32
    save_score_model(rm, "runs/rm/hf", tokenizer=tok)  # a LlamaForSequenceClassification checkpoint

The SFT decoder is cut at layer k like the RL roles (``roles.py``): the trunk (embedding + layers [0, k))
is frozen and the head (layers [k, L), final norm, a bias-free linear ``score`` of ``num_outputs``) trains.
k = 0 is the full-model baseline (everything trains). One output is a reward or preference score;
``num_outputs`` = number of rules gives Sparrow's rule-violation classifier (one logit per rule).

A score is read at a sequence's last token (``pooling="last"``, as Hugging Face's sequence classifiers
do) or averaged over its response tokens (``pooling="mean"``, ``algorithm.rm.pooling``; the mean of the
per-token scores, which for a linear score is the score of the mean-pooled final states). The pooling
is saved in config.json (``score_pooling``); transformers itself always reads the last token. ``bias`` (a buffer, 0 until set) is added to every output:
InstructGPT shifts its RM so SFT outputs score 0 on average before RL (``normalize_reward``).

The checkpoint is a Hugging Face ``<Family>ForSequenceClassification`` directory (``model.*`` plus
``score.weight``; ``reward_bias`` and ``trunk_layers`` in config.json), so transformers loads it and
computes the same raw scores (the tests check this).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from torch import nn

from ..config.model import LoRAConfig
from .hf import _weight_files, _write_shards, architecture, atomic_directory, config_from_hf, config_to_hf
from .lora import apply_lora, fresh_adapter, is_adapter, merge_lora_state
from .roles import RoleHead
from .transformer import LayerSpec, Transformer, TransformerConfig



class ScoreModel(nn.Module):
    """Frozen trunk (k > 0) and a trainable head with a linear score (see the module docstring)."""

    def __init__(self, cfg: TransformerConfig, trunk_layers: int, num_outputs: int = 1,
                 spec: LayerSpec = LayerSpec(), lora: LoRAConfig | None = None, pooling: str = "last") -> None:
        """``lora`` with rank > 0: the head's layers train low-rank adapters, its score in full."""
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"score pooling must be 'last' or 'mean', got {pooling!r}")
        self.pooling = pooling
        self.lora = lora if lora is not None and lora.rank > 0 else None
        if not 0 <= trunk_layers < cfg.num_layers:
            raise ValueError(f"trunk_layers={trunk_layers} must be in [0, num_layers={cfg.num_layers})")
        self.config, self.trunk_layers, self.num_outputs = cfg, trunk_layers, num_outputs
        self.trunk = None
        if trunk_layers > 0:
            self.trunk = Transformer(cfg, spec, layers=range(trunk_layers), final_norm=False, lm_head=False)
            self.trunk.requires_grad_(False)
        self.head = RoleHead(cfg, trunk_layers, "scalar", spec, num_outputs=num_outputs)
        if self.lora is not None:
            apply_lora(self.head, self.lora)
        self.register_buffer("bias", torch.zeros(num_outputs), persistent=True)

    @classmethod
    def from_lm(cls, lm: Transformer, trunk_layers: int, num_outputs: int = 1,
                generator: torch.Generator | None = None, lora: LoRAConfig | None = None,
                pooling: str = "last", head_attention: str = "copy") -> "ScoreModel":
        """Trunk and head layers copied from a language model (the SFT model); the score is drawn from
        N(0, 1/(D+1)) as in InstructGPT-style RMs started from an LM (small, so initial scores are near 0).

        ``head_attention="uniform"``: the first head layer's query projection (weight and bias) starts at
        zero instead, so its attention scores are all 0 and every position averages the values of all it
        can see: att_t = (1/|V_t|) sum_{s in V_t} W_v x_s. The last token then starts from the mean of the
        trunk's states over the sequence, a readout that a linear probe measures (``rlhf-engine probe``,
        'mean' column) even where the copied attention does not gather it; training sharpens it from there.
        With LoRA the zeroed base stays frozen and the query is the adapters' low-rank update."""
        if head_attention not in ("copy", "uniform"):
            raise ValueError(f"head_attention must be 'copy' or 'uniform', got {head_attention!r}")
        with torch.device("meta"):
            model = cls(lm.config, trunk_layers, num_outputs, lora=lora, pooling=pooling)
        src = lm.state_dict()
        state = {}
        query = f"head.layers.{trunk_layers}.self_attn.q_proj."
        for name, value in model.state_dict().items():
            if head_attention == "uniform" and name.startswith(query) and not is_adapter(name):
                state[name] = torch.zeros(value.shape)
            elif is_adapter(name):
                state[name] = fresh_adapter(name, value.shape, generator)
            elif name == "bias":
                state[name] = torch.zeros(num_outputs)
            elif name == "head.score.weight":
                D = lm.config.hidden_size
                state[name] = torch.randn(num_outputs, D, generator=generator) / (D + 1) ** 0.5
            else:
                state[name] = src[name.split(".", 1)[1]]
        model.load_state_dict({k: v.detach().clone().float() for k, v in state.items()}, strict=True, assign=True)
        if model.trunk is not None:
            model.trunk.requires_grad_(False)
        return model

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, S)
        *,
        document_ids: torch.Tensor | None = None,  # (B, S) packed sequences, PAD_DOCUMENT on padding
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores at every position, (B, S, num_outputs) in fp32; read each sequence's last token."""
        if document_ids is None and positions is None:  # the head sees states, not tokens: give the length
            B, S = input_ids.shape[:2]
            positions = torch.arange(S, device=input_ids.device).expand(B, S)
        return self.stage_forward(input_ids, range(self.config.num_layers), first=True, last=True,
                                  document_ids=document_ids, positions=positions)

    def stage_forward(
        self,
        x: torch.Tensor,  # (B, S) tokens on the first stage, else (B, S, D)
        layers: Sequence[int],  # global layer indices this stage runs
        *,
        first: bool,
        last: bool,
        document_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``layers`` of the frozen trunk (no graph) and of the head, the embedding if ``first``, the
        final norm and score if ``last``; ``forward`` is this over all layers (``parallel/pipeline.py``)."""
        k = self.trunk_layers
        trunk_part, head_part = [i for i in layers if i < k], [i for i in layers if i >= k]
        if first:
            if self.trunk is not None:
                with torch.no_grad():
                    x = self.trunk.embed(x)  # (B, S, D)
            else:
                x = self.head.embed(x)
        ctx = (self.trunk if self.trunk is not None else self.head).layer_context(x, positions=positions, document_ids=document_ids)
        if trunk_part:
            with torch.no_grad():  # frozen: no graph through the trunk
                x = self.trunk.run_layers(x, ctx, trunk_part)
        x = self.head.run_layers(x, ctx, head_part)
        if not last:
            return x
        return self.head.score(self.head.norm(x)).float() + self.bias  # (B, S, num_outputs)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Trunk and head as one decoder's state (our names) plus ``score.weight``; adapters merged."""
        state = {} if self.trunk is None else dict(self.trunk.state_dict())
        state.update({k: v for k, v in self.head.state_dict().items()})
        return merge_lora_state(state, self.lora.alpha / self.lora.rank) if self.lora is not None else state


def save_score_model(model: ScoreModel, path: str | os.PathLike, *, tokenizer: Any = None,
                     labels: list[str] | None = None) -> Path:
    """Write ``model`` as a Hugging Face sequence-classification checkpoint, atomically (assembled beside
    ``path`` and renamed into place). ``labels`` name the outputs (e.g. the rules)."""
    cfg = model.config
    token_ids = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")} if tokenizer else {}
    state = {}
    for k, v in model.full_state_dict().items():
        state[k if k.startswith("score.") else f"model.{k}"] = v.detach().float().cpu().contiguous()
    hf_cfg = config_to_hf(TransformerConfig(**{**cfg.__dict__, "tie_word_embeddings": False}), torch.float32, **token_ids)
    hf_cfg.architectures = [architecture(cfg.family, "ForSequenceClassification")]
    hf_cfg.num_labels = model.num_outputs
    if labels is not None:
        if len(labels) != model.num_outputs:
            raise ValueError(f"{len(labels)} labels for {model.num_outputs} outputs")
        hf_cfg.id2label = dict(enumerate(labels))
        hf_cfg.label2id = {name: i for i, name in enumerate(labels)}
    hf_cfg.reward_bias = model.bias.tolist()
    hf_cfg.trunk_layers = model.trunk_layers
    hf_cfg.score_pooling = model.pooling
    path = Path(path)
    with atomic_directory(path) as tmp:
        hf_cfg.save_pretrained(tmp)
        _write_shards(state, tmp, 5 * 2**30)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def load_score_model(path: str | os.PathLike, *, trunk_layers: int | None = None) -> ScoreModel:
    """Read a checkpoint written by ``save_score_model`` (or any HF Llama/Mistral/Qwen2 sequence
    classifier). ``trunk_layers`` defaults to the saved cut."""
    from transformers import AutoConfig  # lazy: transformers is slow to import

    path = Path(path)
    hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    cfg = TransformerConfig(**{**config_from_hf(hf_cfg, path / "config.json", head="ForSequenceClassification").__dict__, "tie_word_embeddings": False})
    k = trunk_layers if trunk_layers is not None else int(getattr(hf_cfg, "trunk_layers", 0))
    with torch.device("meta"):
        model = ScoreModel(cfg, k, int(hf_cfg.num_labels), pooling=getattr(hf_cfg, "score_pooling", "last"))
    flat: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                flat[name.removeprefix("model.")] = f.get_tensor(name).float()
    state = {"bias": torch.tensor(getattr(hf_cfg, "reward_bias", None) or [0.0] * model.num_outputs)}
    for name in model.state_dict():
        if name == "bias":
            continue
        key = name.split(".", 1)[1]  # trunk.X / head.X -> X
        if key not in flat:
            raise ValueError(f"{path}: missing tensor {key!r}")
        state[name] = flat[key]
    model.load_state_dict(state, strict=True, assign=True)
    if model.trunk is not None:
        model.trunk.requires_grad_(False)
    return model
