"""Result types shared by the implementations."""

from __future__ import annotations

from typing import NamedTuple

import torch


class LogprobOutput(NamedTuple):
    """Per-token results, each (N,) fp32 (or the caller's leading shape); None when not requested.

    logp: log p(y | x) under the policy; entropy: H(p); ref_logp: log q(y | x) under the reference
    (never has a gradient); kl: exact KL(p || q) summed over the vocabulary; is_argmax: bool, the target
    is a most likely token under the policy (next-token accuracy without logits; ties count).
    """

    logp: torch.Tensor | None
    entropy: torch.Tensor | None
    ref_logp: torch.Tensor | None
    kl: torch.Tensor | None
    is_argmax: torch.Tensor | None = None
