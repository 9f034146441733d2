"""Supervised fine-tuning loss: next-token cross entropy on the tokens the model should produce."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.packing import IGNORE_INDEX, PackedBatch
from ..models.transformer import Transformer


def sft_loss(model: Transformer, batch: PackedBatch, num_targets: int) -> tuple[torch.Tensor, dict[str, float]]:
    """sum over target tokens of -log p(y_t | x_<t), divided by ``num_targets``.

    ``num_targets`` counts the targets of the whole accumulated step (all micro-batches), so the sum of
    micro-batch losses is the token mean over the step however the tokens fall into micro-batches.
    Logits are formed only at target positions ([n, V], not [B, S, V]).
    """
    hidden = model(batch.input_ids, document_ids=batch.document_ids)  # (B, S, D)
    keep = batch.labels != IGNORE_INDEX  # (B, S)
    logits = model.logits(hidden[keep]).float()  # (n, V)
    targets = batch.labels[keep]  # (n,)
    nll = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum()
    return nll / max(num_targets, 1), {"nll_sum": nll.item(), "correct": correct.item(), "targets": int(keep.sum())}
