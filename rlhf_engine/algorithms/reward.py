"""Reward, preference and rule-model losses (pure functions on scores) and their objectives.

Ranking RM (Ouyang et al. 2022, InstructGPT, eq. 1): for each prompt, all C(K, 2) pairs of its K ranked
responses go in one batch and each response is forwarded once;

    loss = -1/M * sum over pairs (w, l) of log sigmoid(r(x, y_w) - r(x, y_l))

with M the number of (untied) pairs. Sparrow's preference model (Glaese et al. 2022, sec. 2.3 and
app. F): pick-one-of-N cross entropy over the candidates (plus distractor responses taken from other
prompts), a Bradley-Terry term on the chosen response against each other option, and a regulariser
pulling scores toward 0:

    loss_p = -log softmax(s_p)[c_p] + w_bt * mean_o -log sigmoid(s_p,c - s_p,o) + w_reg * mean_o s_p,o^2

Sparrow's rule-violation classifier: one logit per rule, binary cross entropy on the labeled (dialogue,
rule) entries; "unsure" labels are dropped before this point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.preference import ChoiceBatch, PairBatch, RuleBatch
from ..models.score import ScoreModel


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """(M,), (M,) scores -> (M,) per-pair -log sigmoid(r_w - r_l)."""
    return -F.logsigmoid(chosen - rejected)


def choice_loss(scores: torch.Tensor, valid: torch.Tensor, chosen: torch.Tensor, *, bt_weight: float,
                reg_weight: float) -> torch.Tensor:
    """(P, N) scores, (P, N) bool valid options, (P,) chosen column -> (P,) per-prompt loss (see above)."""
    masked = scores.masked_fill(~valid, float("-inf"))
    ce = -(masked.log_softmax(-1).gather(1, chosen[:, None]).squeeze(1))  # (P,)
    s_c = scores.gather(1, chosen[:, None])  # (P, 1)
    others = valid.clone()
    others[torch.arange(len(chosen)), chosen] = False
    bt = (-F.logsigmoid(s_c - scores) * others).sum(1) / others.sum(1).clamp(min=1)  # (P,)
    reg = (scores.square() * valid).sum(1) / valid.sum(1)  # (P,)
    return ce + bt_weight * bt + reg_weight * reg


def rule_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(R, n_rules) violation logits, labels in {0, 1}, bool mask -> (R, n_rules) BCE, 0 where masked."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * mask


# ---------------------------------------------------------------------------------------------- objectives
# (model, micro-batch, global target count) -> (loss, per-target stat sums); see trainer.py.


def ranking_objective(model: ScoreModel, batch: PairBatch, num_targets: int):
    """Pairwise ranking loss; targets are pairs. Stats: pairwise accuracy, mean margin r_w - r_l."""
    s = batch.seqs
    scores = s.read_last(model(s.input_ids, document_ids=s.document_ids)[..., 0])  # (R,) one forward each
    r_w, r_l = scores[batch.chosen], scores[batch.rejected]  # (M,)
    loss = pairwise_loss(r_w, r_l).sum() / max(num_targets, 1)
    margin = (r_w - r_l).detach()
    return loss, {"accuracy": float((margin > 0).sum()), "margin": float(margin.sum())}


def choice_objective(bt_weight: float, reg_weight: float):
    def objective(model: ScoreModel, batch: ChoiceBatch, num_targets: int):
        """Sparrow preference loss; targets are prompts. Stats: top-1 accuracy, mean score."""
        s = batch.seqs
        per_seq = s.read_last(model(s.input_ids, document_ids=s.document_ids)[..., 0])  # (R,)
        valid = batch.options >= 0
        scores = per_seq[batch.options.clamp(min=0)] * valid  # (P, N)
        loss = choice_loss(scores, valid, batch.chosen, bt_weight=bt_weight, reg_weight=reg_weight)
        picked = scores.detach().masked_fill(~valid, float("-inf")).argmax(1)
        mean_score = (scores.detach() * valid).sum(1) / valid.sum(1)
        return loss.sum() / max(num_targets, 1), {"accuracy": float((picked == batch.chosen).sum()),
                                                  "mean_score": float(mean_score.sum())}

    return objective


def rule_objective(model: ScoreModel, batch: RuleBatch, num_targets: int):
    """Rule-violation BCE; targets are labeled (dialogue, rule) entries. Stat: accuracy at p = 0.5."""
    s = batch.seqs
    logits = s.read_last(model(s.input_ids, document_ids=s.document_ids))  # (R, n_rules)
    loss = rule_loss(logits, batch.labels, batch.mask).sum() / max(num_targets, 1)
    right = ((logits.detach() > 0).float() == batch.labels) & batch.mask
    return loss, {"accuracy": float(right.sum())}
