"""What the trainer optimises: a loss over one micro-batch, normalised by the step's totals.

    objective = Objective(sft_loss, target="targets")
    loss, stats = objective(model, micro_batch, totals)    # totals: data.streams.StepTotals

``fn(model, batch, totals) -> (loss, stats)``: the loss of the micro-batch already divided by the
whole optimizer step's totals (``totals[target]`` for a plain mean; an algorithm may divide by several,
as RL does by response tokens and sequences), so the sum of the micro-batches' losses over
accumulation and data-parallel ranks is the step's loss. ``stats`` are *sums* over the micro-batch; the
trainer adds them over micro-batches and ranks and divides each by the total named in
``stat_counts`` (default: ``target``). ``target`` is also what the trainer reports as ``targets``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..data.streams import StepTotals

LossFn = Callable[[Any, Any, StepTotals], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass(frozen=True)
class Objective:
    fn: LossFn
    target: str  # the count the loss is a mean over: tokens of labels, pairs, prompts, sequences...
    stat_counts: Mapping[str, str] = field(default_factory=dict)  # stat -> the total it is a mean over

    def __call__(self, model, batch, totals: StepTotals) -> tuple[torch.Tensor, dict[str, float]]:
        return self.fn(model, batch, totals)

    def count_of(self, stat: str) -> str:
        return self.stat_counts.get(stat, self.target)
