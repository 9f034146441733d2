"""FP8 training of the linear layers: torchao float8 (PyTorch-native) or NVIDIA Transformer Engine.

    model = apply_fp8(model, cfg.precision.fp8)      # before tensor parallelism and FSDP (runtime.parallelize)
    fp8_metrics(model)                               # per-step numerics for the metrics

Which linears: every ``nn.Linear`` of the decoder layers whose qualified name contains none of
``exclude`` (default: the LM head and the value/reward ``score`` heads stay in the compute dtype), both
of whose dimensions are multiples of 16 (FP8 GEMM tiles), optionally not in the first and last layer
(``keep_first_last``) and, for role models, only in the listed roles' heads (``roles``; ``trunk`` names
the frozen shared trunk).

- **torchao**: ``torchao.float8.convert_to_float8_training`` with that filter, recipe ``tensorwise``
  (dynamic per-tensor scales; with FSDP2, optionally float8 all-gather) or ``rowwise`` (per-row scales,
  bf16 compute). Dynamic scaling computes amax on the fly, so nothing overflows by construction; the
  metrics report the weights' amax and scale.
- **te**: each selected ``nn.Linear`` is replaced by ``transformer_engine.pytorch.Linear`` with the same
  weights, and the model's forward runs under ``te.fp8_autocast`` with the recipe (delayed scaling with
  an amax history, current scaling, or block scaling). Needs CUDA and ``pip install .[fp8]``; requested
  without it, a clear error.

Composition: FP8 applies before tensor parallelism and FSDP2 (sharded float8 weights need the conversion
first). Under tensor parallelism torchao's Float8Linear layers get torchao's float8 parallel styles
(``parallel.tensor_parallel``). Transformer Engine's own tensor-parallel linears are not wired: the
runtime refuses backend ``te`` with tp > 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.distributed as dist
from torch import nn

from ..config import FP8Config

FP8_E4M3_MAX = 448.0


def selected(name: str, module: nn.Module, cfg: FP8Config, num_layers: int | None) -> bool:
    """Whether the linear ``name`` gets FP8 (module docstring)."""
    if not isinstance(module, nn.Linear) or any(x in name for x in cfg.exclude):
        return False
    if module.in_features % 16 or module.out_features % 16:
        return False
    parts = name.split(".")
    if cfg.roles is not None:
        role = parts[1] if parts[0] == "heads" and len(parts) > 1 else parts[0]
        if role not in cfg.roles:
            return False
    if cfg.keep_first_last and num_layers is not None and "layers" in parts:
        index = int(parts[parts.index("layers") + 1])
        if index in (0, num_layers - 1):
            return False
    return True


def apply_fp8(model: nn.Module, cfg: FP8Config | None) -> nn.Module:
    if cfg is None:
        return model
    num_layers = getattr(getattr(model, "config", None), "num_layers", None)
    names = [n for n, m in model.named_modules() if selected(n, m, cfg, num_layers)]
    if not names:
        raise ValueError("precision.fp8: no linear layer qualifies (check exclude/roles; FP8 GEMMs need both "
                         "dimensions to be multiples of 16)")
    if cfg.backend == "torchao":
        return _torchao(model, cfg, set(names))
    return _transformer_engine(model, cfg, names)


def _torchao(model: nn.Module, cfg: FP8Config, names: set[str]) -> nn.Module:
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # optional: torchao
    except ImportError as err:
        raise ImportError("precision.fp8.backend=torchao needs torchao: pip install torchao") from err
    config = Float8LinearConfig.from_recipe_name(cfg.recipe)
    if cfg.float8_all_gather:
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=True)
    if not torch.cuda.is_available():
        # No FP8 tensor cores: the same e4m3/e5m2 casts and scales, with each GEMM on the dequantized
        # operands (fp32 accumulation, as _scaled_mm's). torch's CPU _scaled_mm took 64 ms per call in the
        # tiny test models' layers on a 2-core Xeon: the FP8 tests ran 870 s with it, 30 s emulated.
        config = dataclasses.replace(config, emulate=True)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn in names)
    return model


def _transformer_engine(model: nn.Module, cfg: FP8Config, names: list[str]) -> nn.Module:
    try:
        import transformer_engine.pytorch as te  # optional: Transformer Engine (CUDA only)
        from transformer_engine.common import recipe as te_recipe  # optional (see above)
    except ImportError as err:
        raise ImportError("precision.fp8.backend=te needs NVIDIA Transformer Engine, which builds only with CUDA: "
                          "pip install -e '.[fp8]' on a GPU machine (or use precision.fp8.backend=torchao)") from err
    if not torch.cuda.is_available():
        raise RuntimeError("precision.fp8.backend=te needs a CUDA GPU (FP8 tensor cores: H100 or later)")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old: nn.Linear = getattr(parent, child)
        new = te.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                        params_dtype=old.weight.dtype, device=old.weight.device)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.weight.requires_grad_(old.weight.requires_grad)
        setattr(parent, child, new)
    recipe = {
        "delayed": lambda: te_recipe.DelayedScaling(amax_history_len=cfg.amax_history, amax_compute_algo="max"),
        "current": lambda: te_recipe.Float8CurrentScaling(),
        "block": lambda: te_recipe.MXFP8BlockScaling(),
    }[cfg.recipe]()
    forward = model.forward

    @functools.wraps(forward)
    def fp8_forward(*args, **kwargs):
        with te.fp8_autocast(enabled=True, fp8_recipe=recipe):
            return forward(*args, **kwargs)

    model.forward = fp8_forward
    return model


@torch.no_grad()
def fp8_metrics(model: nn.Module) -> dict[str, float]:
    """Numerics of the FP8 layers: how many, the largest weight amax, the smallest scale
    (448 / amax for e4m3) and, for TE's delayed scaling, the amax history's largest value.

    A collective when the weights are sharded (tensor parallel, FSDP): every rank calls it, and the amax
    of a sharded weight is the maximum over its shards."""
    amaxes, te_hist, sharded = [], [], False
    for m in model.modules():
        kind = type(m).__name__
        if kind == "Float8Linear" or (kind == "Linear" and type(m).__module__.startswith("transformer_engine")):
            w = m.weight.detach()
            if hasattr(w, "to_local"):
                w, sharded = w.to_local(), True
            amaxes.append(w.abs().max().float() if w.numel() else w.new_zeros((), dtype=torch.float32))
            meta = getattr(m, "fp8_meta", None)
            if meta and "scaling_fwd" in meta:
                te_hist.append(float(meta["scaling_fwd"].amax_history.max()))
    if not amaxes:
        return {}
    local = torch.stack(amaxes)  # (layers,)
    if sharded and dist.is_initialized():
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
    amax = float(local.max())
    out = {"fp8/layers": float(len(amaxes)), "fp8/weight_amax_max": amax,
           "fp8/weight_scale_min": FP8_E4M3_MAX / amax if amax > 0 else math.inf}
    if te_hist:
        out["fp8/amax_history_max"] = max(te_hist)
    return out
