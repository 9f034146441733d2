"""Supervised fine-tuning loss: next-token cross entropy on the tokens the model should produce."""

from __future__ import annotations

import torch

from rlhf_kernels import LogprobOutput

from ..data.packing import PackedBatch
from ..data.streams import StepTotals
from .objective import ModelPass, Objective


def sft_nll(out: LogprobOutput, totals: StepTotals) -> tuple[torch.Tensor, dict[str, float]]:
    """sum over target tokens of -log p(y_t | x_<t), divided by ``totals["targets"]``.

    ``targets`` counts the label tokens of the whole accumulated step (all micro-batches and all
    data-parallel ranks), so the sum of micro-batch losses is the token mean over the global step however
    the tokens fall into micro-batches. Log-probs come from the fused LM-head kernel (no logits);
    ignored positions have logp = 0. Stats are sums, to be added across micro-batches and ranks.
    """
    nll = -out.logp.sum()
    stats = {"accuracy": float(out.is_argmax.sum())}  # per-target sum: the trainer reports the mean
    return nll / max(totals["targets"], 1), stats


def sft_pass(batch: PackedBatch) -> list[ModelPass]:
    return [ModelPass({"input_ids": batch.input_ids, "document_ids": batch.document_ids, "targets": batch.labels},
                      sft_nll)]


SFT = Objective(sft_pass, target="targets")
