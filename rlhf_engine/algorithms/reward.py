"""Reward, preference and rule-model losses (pure functions on scores) and their objectives.

Ranking RM (Ouyang et al. 2022, InstructGPT, eq. 1): for each prompt, all C(K, 2) pairs of its K ranked
responses go in one batch and each response is forwarded once; each prompt is one batch element:

    loss = -1/P * sum over prompts p of 1/C(K_p, 2) * sum over its untied pairs (w, l) of
           log sigmoid(r(x, y_w) - r(x, y_l))

With soft labels (an AI labeler's probability t that y_w is preferred, Bai et al. 2022) each pair's term
is the cross entropy t log sigmoid(r_w - r_l) + (1 - t) log sigmoid(r_l - r_w) instead.

(``algorithm.rm.weighting: pair`` pools every pair instead: -1/M sum over all M pairs).

Sparrow's preference model (Glaese et al. 2022, sec. 2.3 and app. F): pick-one-of-N cross entropy over the candidates (plus distractor responses taken from other
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
from ..data.streams import StepTotals
from .objective import ModelPass, Objective


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """(M,), (M,) scores -> (M,) per-pair -log sigmoid(r_w - r_l); with soft targets t = P(w preferred),
    the cross entropy -(t log sigmoid(r_w - r_l) + (1 - t) log sigmoid(r_l - r_w)) (t = 1: the same)."""
    d = chosen - rejected
    if target is None:
        return -F.logsigmoid(d)
    return -(target * F.logsigmoid(d) + (1.0 - target) * F.logsigmoid(-d))


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
# micro-batch -> one score-model pass; (scores (R, S, outputs), step totals) -> (loss, stat sums); see objective.py


def score_inputs(seqs) -> dict:
    """The score model's forward over a micro-batch's packed sequences (each response forwarded once)."""
    return {"input_ids": seqs.input_ids, "document_ids": seqs.document_ids}


def ranking_objective(weighting: str = "prompt", pooling: str = "last") -> Objective:
    """The ranking RM's objective. Stats (means over pairs): pairwise accuracy, margin r_w - r_l.

    ``weighting``: ``prompt`` (InstructGPT, default): each prompt is one batch element and its pairs
    are weighted 1 / C(K, 2), loss = 1/P sum_p 1/C(K_p, 2) sum_(w,l) in p -log sigmoid(r_w - r_l), so a
    K = 9 prompt (36 pairs) weighs as much as a K = 4 prompt (6 pairs). ``pair``: the mean over every
    pair pooled, loss = 1/M sum -log sigmoid(r_w - r_l) (what the engine did before; a K = 9 prompt
    then weighs 6x a K = 4 prompt). ``pooling``: a response's score is read at its last token or is the
    mean over its response tokens (``Sequences.read_score``).
    """
    per_prompt = weighting == "prompt"

    def passes(batch: PairBatch) -> list[ModelPass]:
        return [ModelPass(score_inputs(batch.seqs), lambda out, totals: loss(batch, out, totals))]

    def loss(batch: PairBatch, out: torch.Tensor, totals: StepTotals):
        scores = batch.seqs.read_score(out[..., 0], pooling)  # (R,) one forward per response
        r_w, r_l = scores[batch.chosen], scores[batch.rejected]  # (M,)
        soft = bool((batch.target < 1).any())  # hard labels take the plain -log sigmoid path
        per_pair = pairwise_loss(r_w, r_l, batch.target.to(r_w.dtype) if soft else None)
        if per_prompt:
            loss = (per_pair * batch.prompt_weight).sum() / max(totals["prompts"], 1)
        else:
            loss = per_pair.sum() / max(totals["pairs"], 1)
        margin = (r_w - r_l).detach()
        return loss, {"accuracy": float((margin > 0).sum()), "margin": float(margin.sum())}

    return Objective(passes, target="prompts" if per_prompt else "pairs",
                     stat_counts={"accuracy": "pairs", "margin": "pairs"})


def choice_objective(bt_weight: float, reg_weight: float) -> Objective:
    def passes(batch: ChoiceBatch) -> list[ModelPass]:
        return [ModelPass(score_inputs(batch.seqs), lambda out, totals: loss(batch, out, totals))]

    def loss(batch: ChoiceBatch, out: torch.Tensor, totals: StepTotals):
        """Sparrow preference loss; targets are prompts. Stats: top-1 accuracy, mean score."""
        per_seq = batch.seqs.read_last(out[..., 0])  # (R,)
        valid = batch.options >= 0
        scores = per_seq[batch.options.clamp(min=0)] * valid  # (P, N)
        losses = choice_loss(scores, valid, batch.chosen, bt_weight=bt_weight, reg_weight=reg_weight)
        picked = scores.detach().masked_fill(~valid, float("-inf")).argmax(1)
        mean_score = (scores.detach() * valid).sum(1) / valid.sum(1)
        return losses.sum() / max(totals["prompts"], 1), {"accuracy": float((picked == batch.chosen).sum()),
                                                        "mean_score": float(mean_score.sum())}

    return Objective(passes, target="prompts")


def _rule_passes(batch: RuleBatch) -> list[ModelPass]:
    return [ModelPass(score_inputs(batch.seqs), lambda out, totals: _rule_loss(batch, out, totals))]


def _rule_loss(batch: RuleBatch, out: torch.Tensor, totals: StepTotals):
    """Rule-violation BCE; targets are labeled (dialogue, rule) entries. Stat: accuracy at p = 0.5."""
    logits = batch.seqs.read_last(out)  # (R, n_rules)
    loss = rule_loss(logits, batch.labels, batch.mask).sum() / max(totals["labels"], 1)
    right = ((logits.detach() > 0).float() == batch.labels) & batch.mask
    return loss, {"accuracy": float(right.sum())}


RULES = Objective(_rule_passes, target="labels")
