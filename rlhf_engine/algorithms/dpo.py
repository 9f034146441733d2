"""Direct preference optimisation and relatives: losses on sequence log-prob ratios, and the objective.

With Δ_w = log π(y_w|x) - log π_ref(y_w|x), Δ_l likewise (sums over response tokens), β > 0:

    sigmoid  (DPO, Rafailov et al. 2023)     -log σ(β (Δ_w - Δ_l))
    cdpo     (conservative DPO, label noise ε) -(1 - ε) log σ(β (Δ_w - Δ_l)) - ε log σ(-β (Δ_w - Δ_l))
    ipo      (Azar et al. 2023)               ((Δ_w / n_w - Δ_l / n_l) - 1 / (2β))^2

IPO uses per-token mean log-ratios (n = response tokens), as TRL does; the tests check each loss against
TRL's own code. The implicit rewards β Δ_w and β Δ_l are reported. The policy and the frozen reference head
run in one forward over the shared trunk (the trunk once, the reference head without a graph), which
under pipeline parallelism is one pass through the stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.preference import PairBatch
from ..data.streams import StepTotals
from ..models.roles import Role, RoleOutput
from ..registry import Registry
from .objective import ModelPass, Objective

DPO_LOSSES: Registry = Registry("DPO loss")


@DPO_LOSSES.register("sigmoid")
def sigmoid_loss(d_w, d_l, n_w, n_l, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """(M,) log-ratio sums of chosen/rejected (and token counts) -> (M,) DPO losses."""
    if label_smoothing:
        raise ValueError("label_smoothing > 0 is conservative DPO: use loss_type 'cdpo'")
    return -F.logsigmoid(beta * (d_w - d_l))


@DPO_LOSSES.register("cdpo")
def cdpo_loss(d_w, d_l, n_w, n_l, *, beta: float, label_smoothing: float) -> torch.Tensor:
    if not 0.0 < label_smoothing < 0.5:
        raise ValueError(f"cdpo needs 0 < label_smoothing < 0.5 (the assumed label-flip rate), got {label_smoothing}")
    z = beta * (d_w - d_l)
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


@DPO_LOSSES.register("ipo")
def ipo_loss(d_w, d_l, n_w, n_l, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    if label_smoothing:
        raise ValueError("ipo takes no label_smoothing")
    return ((d_w / n_w.clamp(min=1) - d_l / n_l.clamp(min=1)) - 1 / (2 * beta)) ** 2


def dpo_objective(loss_type: str, beta: float, label_smoothing: float = 0.0) -> Objective:
    loss_fn = DPO_LOSSES[loss_type]

    def passes(batch: PairBatch) -> list[ModelPass]:
        s = batch.seqs
        inputs = {"input_ids": s.input_ids, "document_ids": s.document_ids, "targets": s.labels,
                  "roles": (Role.POLICY, Role.REFERENCE)}
        return [ModelPass(inputs, lambda out, totals: loss(batch, out, totals))]

    def loss(batch: PairBatch, out: RoleOutput, totals: StepTotals):
        """Targets are pairs. Stats: reward accuracy (Δ_w > Δ_l), implicit rewards and their margin."""
        s = batch.seqs
        ratio = s.sum_per_sequence(out.logp.float() - out.ref_logp.float())  # (R,) log π/π_ref per sequence
        counts = s.count_per_sequence()  # (R,)
        d_w, d_l = ratio[batch.chosen], ratio[batch.rejected]  # (M,)
        losses = loss_fn(d_w, d_l, counts[batch.chosen], counts[batch.rejected], beta=beta,
                         label_smoothing=label_smoothing)
        r_w, r_l = beta * d_w.detach(), beta * d_l.detach()
        return losses.sum() / max(totals["pairs"], 1), {
            "accuracy": float((r_w > r_l).sum()), "reward_chosen": float(r_w.sum()),
            "reward_rejected": float(r_l.sum()), "margin": float((r_w - r_l).sum())}

    return Objective(passes, target="pairs")
