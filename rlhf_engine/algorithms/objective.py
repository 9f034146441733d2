"""What the trainer optimises: per micro-batch, model passes and a loss normalised by the step's totals.

    objective = Objective(lambda b: [ModelPass(inputs, loss)], target="targets")
    loss, stats = objective(model, micro_batch, totals)    # totals: data.streams.StepTotals

A micro-batch becomes one or more ``ModelPass``es: the keyword arguments of one model forward
(``inputs``), and ``loss(output, totals) -> (loss, stats)`` on that forward's output. Most objectives
have one pass; PPO-ptx adds a pass over pretraining rows. Keeping the forward's inputs apart from the
loss is what lets a pipeline-parallel model run the forward over its stages and the loss on the last
one (``parallel/pipeline.py``); in one process ``Objective.__call__`` runs them back to back.

Each loss is the micro-batch's share already divided by the whole optimizer step's totals
(``totals[target]`` for a plain mean; an algorithm may divide by several, as RL does by response tokens
and sequences), so the sum over micro-batches, passes and data-parallel ranks is the step's loss.
``stats`` are *sums*; the trainer adds them over micro-batches and ranks and divides each by the total
named in ``stat_counts`` (default: ``target``); a stat named ``*_max`` is a maximum instead (``merge_stats``). ``target`` is also what the trainer reports as ``targets``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..data.streams import StepTotals

LossOfOutput = Callable[[Any, StepTotals], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass(frozen=True)
class ModelPass:
    inputs: dict[str, Any]  # keyword arguments of the model's forward (input_ids, document_ids, targets, ...)
    loss: LossOfOutput  # the forward's output -> (loss, stat sums)


@dataclass(frozen=True)
class Objective:
    passes: Callable[[Any], list[ModelPass]]  # micro-batch -> its model passes
    target: str  # the count the loss is a mean over: tokens of labels, pairs, prompts, sequences...
    stat_counts: Mapping[str, str] = field(default_factory=dict)  # stat -> the total it is a mean over

    def __call__(self, model, batch, totals: StepTotals) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's loss and stat sums, its passes run one after another on ``model``."""
        loss, stats = None, {}
        for p in self.passes(batch):
            inputs = dict(p.inputs)
            part, part_stats = p.loss(model(inputs.pop("input_ids"), **inputs), totals)
            loss = part if loss is None else loss + part
            merge_stats(stats, part_stats)
        return loss, stats

    def count_of(self, stat: str) -> str:
        return self.stat_counts.get(stat, self.target)


def is_maximum(stat: str) -> bool:
    """A stat named ``*_max`` is a maximum: merged by max over passes, micro-batches and ranks, and
    reported as it is (every other stat is a sum, reported divided by its count)."""
    return stat.endswith("_max")


def merge_stats(total: dict[str, float], part: Mapping[str, float]) -> dict[str, float]:
    """Add ``part``'s stats into ``total`` (in place): sums add, maxima (``is_maximum``) take the larger."""
    for k, v in part.items():
        total[k] = (max(total[k], v) if k in total else v) if is_maximum(k) else total.get(k, 0.0) + v
    return total
