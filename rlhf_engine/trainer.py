"""Training-loop building blocks shared by every stage: optimizer, LR schedule, one accumulated step,
metrics.

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)
    metrics = train_step(model, optimizer, scheduler, micro_batches, loss_fn, cfg.optim.grad_clip)

``loss_fn(model, micro_batch, num_targets) -> (loss, stats)`` returns a loss already divided by the
step's total target count, so accumulation is a plain sum of backward passes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .config import OptimConfig

LossFn = Callable[[nn.Module, Any, int], "tuple[torch.Tensor, dict[str, float]]"]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on parameters with ndim >= 2 only (norm gains and biases are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of cfg.lr at optimizer step ``step`` (0-based): linear warmup, then the decay schedule
    from 1 down to min_lr_ratio at ``max_steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: Sequence[Any],
    loss_fn: LossFn,
    grad_clip: float | None,
    *,
    num_targets: int | None = None,
    loss_scale: float = 1.0,
) -> dict[str, float]:
    """Accumulate gradients over ``micro_batches``, clip, step; returns this rank's metrics (sums).

    ``num_targets``: targets in the whole step across data-parallel ranks (default: these micro-batches).
    ``loss_scale``: multiplies each loss before backward; the data-parallel degree under FSDP, which
    averages gradients over ranks while the loss is already a global mean.
    """
    model.train()
    if num_targets is None:
        num_targets = sum(mb.num_targets for mb in micro_batches)
    loss_total, stats_total = 0.0, {}
    for mb in micro_batches:
        loss, stats = loss_fn(model, mb, num_targets)
        (loss * loss_scale).backward()
        loss_total += loss.item()
        for k, v in stats.items():
            stats_total[k] = stats_total.get(k, 0.0) + v
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # DTensor under TP/FSDP
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return {"loss": loss_total, "grad_norm": float(grad_norm), "lr": lr, "targets": num_targets, **stats_total}


class MetricsWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` and echoes selected keys to the terminal."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()

    def write(self, record: dict[str, Any], echo: bool = True) -> None:
        record = {"time_s": round(time.perf_counter() - self.start, 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
            print(shown, file=sys.stderr, flush=True)
