"""Low-rank adapters (LoRA, Hu et al. 2021) on the decoder's linear layers.

A targeted ``nn.Linear`` of weight W (out, in) becomes a ``LoRALinear`` that keeps W and its bias frozen
and learns A (r, in) and B (out, r):

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T

A starts Kaiming-uniform (a = sqrt(5), PEFT's default) and B at zero, so an adapted model computes
exactly what its base does until the first update. ``adapters_disabled(module)`` switches every adapter
under ``module`` off: the RL reference is the policy head with its adapters off, with no copy of its
weights. Parameter names stay the base's (``...q_proj.weight``) with ``lora_A``/``lora_B`` beside them,
so Hugging Face export merges (W + (alpha / r) B A, ``merge_lora_state``) into the plain names, and
``save_peft_adapters`` writes PEFT's own format (``adapter_config.json`` + ``adapter_model.safetensors``).

    apply_lora(model, settings, generator=torch.Generator().manual_seed(0))  # in place; freezes the base
    with adapters_disabled(model): ref = model(ids)                         # the base model
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..config.model import LoRAConfig

LORA_PARAMS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` plus a trainable low-rank update (see the module docstring). A subclass of
    ``nn.Linear`` with the base's own parameters, so names, tensor-parallel styles and FP8 swaps that look
    for ``nn.Linear`` keep working on the base weight."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.scaling = rank, alpha / rank
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(fresh_adapter("lora_A", (rank, self.in_features), generator).to(**like))  # (r, in)
        self.lora_B = nn.Parameter(fresh_adapter("lora_B", (self.out_features, rank)).to(**like))  # (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapters_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        out = F.linear(x, self.weight, self.bias)
        if not self.adapters_enabled:
            return out
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A (out, in), differentiable in A and B; W alone with the adapters off. For
        consumers that take a weight rather than calling the layer: the fused log-prob kernels read an
        adapted LM head's weight this way, so they never see logits either."""
        if not self.adapters_enabled:
            return self.weight
        return self.weight + (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def targets(name: str, patterns: list[str]) -> bool:
    """Whether the module called ``name`` (e.g. ``layers.3.self_attn.q_proj``) is adapted: a pattern
    matches its last component exactly, or, given as a regular expression, its whole name."""
    last = name.rsplit(".", 1)[-1]
    return any(p == last or re.fullmatch(p, name) for p in patterns)


def apply_lora(module: nn.Module, settings: LoRAConfig, generator: torch.Generator | None = None,
               skip: tuple[str, ...] = ("score",)) -> list[str]:
    """Replace the targeted ``nn.Linear``s under ``module`` (never those named in ``skip``) by
    ``LoRALinear``s, in place, and freeze ``module`` except the adapters and the modules named in
    ``settings.trainable`` (``freeze_base``). Returns the adapted module names (an error if none matched:
    a misspelt pattern would train nothing)."""
    adapted = []
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear) and not isinstance(child, LoRALinear) and targets(name, settings.target_modules):
            if name.rsplit(".", 1)[-1] in skip:
                continue
            parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            setattr(parent, name.rpartition(".")[2],
                    LoRALinear(child, settings.rank, settings.alpha, settings.dropout, generator))
            adapted.append(name)
    if not adapted:
        raise ValueError(f"model.lora.target_modules {settings.target_modules} match no linear layer")
    freeze_base(module, settings)
    return adapted


def freeze_base(module: nn.Module, settings: LoRAConfig) -> None:
    """Only adapters train, and the modules named in ``settings.trainable`` (e.g. a reward model's score)."""
    for name, p in module.named_parameters():
        owner = name.rsplit(".", 2)[-2] if "." in name else ""
        p.requires_grad_(is_adapter(name) or owner in settings.trainable)


def is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in LORA_PARAMS


def fresh_adapter(name: str, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """The initial value of adapter tensor ``name`` (fp32; nothing drawn on the meta device): A
    Kaiming-uniform (a = sqrt(5)), B zero."""
    value = torch.zeros(shape)
    if name.endswith("lora_A"):
        nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
    return value


def lora_modules(module: nn.Module) -> Iterator[LoRALinear]:
    return (m for m in module.modules() if isinstance(m, LoRALinear))


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Every adapter under ``module`` off inside the block: the module computes as its base."""
    mods = list(lora_modules(module))
    before = [m.adapters_enabled for m in mods]
    for m in mods:
        m.adapters_enabled = False
    try:
        yield
    finally:
        for m, was in zip(mods, before):
            m.adapters_enabled = was


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A state dict with every ``X.lora_A``/``X.lora_B`` folded into ``X.weight`` (W + scaling * B A, in
    fp32 then cast back) and removed: the plain decoder's names and values."""
    out = {k: v for k, v in state.items() if not is_adapter(k)}
    for key, a in state.items():
        if key.endswith(".lora_A"):
            prefix = key[: -len(".lora_A")]
            w, b = state[f"{prefix}.weight"], state[f"{prefix}.lora_B"]
            out[f"{prefix}.weight"] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return out


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of a state dict only."""
    return {k: v for k, v in state.items() if is_adapter(k)}


def save_peft_adapters(state: dict[str, torch.Tensor], settings: LoRAConfig, path: str | os.PathLike, *,
                       base_model: str | None = None, prefix: str = "model.") -> Path:
    """Write the adapters of a decoder state dict (our names) in PEFT's format, which
    ``peft.PeftModel.from_pretrained(hf_model, path)`` loads onto the base Hugging Face model:
    ``base_model.model.<hf name>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, modules = {}, set()
    for key, value in adapter_state(state).items():
        module, leaf = key.rsplit(".", 1)
        modules.add(module.rsplit(".", 1)[-1])
        hf = module if module.startswith("lm_head") else prefix + module
        tensors[f"base_model.model.{hf}.{leaf}.weight"] = value.detach().cpu().contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": sorted(modules), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }
    tmp = path / ".adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path
