"""Rewards for RL: learned scores, rule compliance, a length penalty, format validity and programmatic
rewards, combined with weights from the config (``reward.*``).

    r(x, y) = w_pref * s_pref(x, y)                                    preference / ranking RM score
            + w_rule * sum_r (1 - sigmoid(z_r(x, y)))                 probability each rule is respected
            - w_len  * max(0, |y| - L) / L                            tokens beyond the target length L
            + w_fmt  * valid(y)                                       a registered format check, 0 or 1
            + sum_f w_f * f(x, y, answer)                             registered programmatic rewards

The Sparrow recipe combines the preference model with rule compliance; InstructGPT uses the RM alone;
verifiable-reward RL uses programmatic checkers (``exact_match``). Programmatic rewards are plain
functions ``f(prompt, response, answer) -> float`` registered by name in ``REWARD_FUNCTIONS``; one
marked ``on_samples = True`` is called as ``f(sample)`` and sees the token ids as well.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .registry import Registry
from .config import RewardConfig
from .data.preference import Sequences, pack_sequences
from .data.task import gold_score
from .models.score import ScoreModel, load_score_model

RewardFn = Callable[[str, str, "str | None"], float]
REWARD_FUNCTIONS: Registry[RewardFn] = Registry("reward function")


def _normalize(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


@REWARD_FUNCTIONS.register("exact_match")
def exact_match(prompt: str, response: str, answer: str | None) -> float:
    """1 when the response equals the reference answer (case, surrounding space and a final period ignored)."""
    return float(answer is not None and _normalize(response) == _normalize(answer))


@REWARD_FUNCTIONS.register("contains_answer")
def contains_answer(prompt: str, response: str, answer: str | None) -> float:
    """1 when the reference answer appears in the response (normalized)."""
    return float(answer is not None and _normalize(answer) in _normalize(response))


@REWARD_FUNCTIONS.register("answer_f1")
def answer_f1(prompt: str, response: str, answer: str | None) -> float:
    """Word-overlap F1 between response and reference answer (SQuAD's partial credit), in [0, 1]."""
    if answer is None:
        return 0.0
    got, want = _normalize(response).split(), _normalize(answer).split()
    common = sum(min(got.count(w), want.count(w)) for w in set(got))
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


@REWARD_FUNCTIONS.register("quickstart_gold")
def quickstart_gold(prompt: str, response: str, answer: str | None) -> float:
    """The quickstart task's hidden gold scorer (``data/task.py``); logged with weight 0 to watch over-optimisation."""
    return gold_score(prompt, response)


@REWARD_FUNCTIONS.register("json_object")
def json_object(prompt: str, response: str, answer: str | None) -> float:
    """1 when the response is a JSON object."""
    try:
        return float(isinstance(json.loads(response), dict))
    except ValueError:
        return 0.0


@REWARD_FUNCTIONS.register("single_line")
def single_line(prompt: str, response: str, answer: str | None) -> float:
    """1 when the response is one non-empty line."""
    return float(bool(response.strip()) and "\n" not in response.strip())


@REWARD_FUNCTIONS.register("no_repetition")
def no_repetition(prompt: str, response: str, answer: str | None) -> float:
    """1 minus the fraction of repeated word 3-grams (degenerate loops score near 0)."""
    words = re.findall(r"\w+", response.lower())
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return 1.0 - (len(grams) - len(set(grams))) / len(grams) if grams else 1.0


@dataclass(frozen=True)
class Sample:
    """One response to score: tokens (for the learned models) and text (for programmatic rewards)."""

    prompt_ids: list[int]
    response_ids: list[int]
    prompt: str
    response: str
    answer: str | None = None


@dataclass(frozen=True)
class RewardBreakdown:
    total: torch.Tensor  # (N,)
    parts: dict[str, torch.Tensor]  # name -> (N,) unweighted component


class CombinedReward:
    """The weighted reward above; models are frozen ``ScoreModel``s sharing the policy's tokenizer."""

    def __init__(self, cfg: RewardConfig, *, preference: ScoreModel | None = None, rules: ScoreModel | None = None,
                 seq_len: int = 4096, pad_id: int = 0, head_pooling: str = "last") -> None:
        """``head_pooling``: how the preference scores of a reward head on the RL roles' shared trunk are
        read (the reward model's pooling): at the last token, or the mean over the response tokens."""
        self.cfg, self.preference, self.rules = cfg, preference, rules
        self.head_pooling = head_pooling
        self.seq_len, self.pad_id = seq_len, pad_id
        self.functions = {name: REWARD_FUNCTIONS[name] for name in cfg.functions}
        self.format = REWARD_FUNCTIONS[cfg.format] if cfg.format is not None else None
        for model in (preference, rules):
            if model is not None:
                model.requires_grad_(False).eval()

    @classmethod
    def from_config(cls, cfg: RewardConfig, *, seq_len: int, pad_id: int,
                    device: torch.device | str = "cpu") -> "CombinedReward":
        load = lambda p: load_score_model(p).to(device) if p is not None else None  # noqa: E731
        return cls(cfg, preference=load(cfg.preference_path), rules=load(cfg.rules_path), seq_len=seq_len,
                   pad_id=pad_id)

    @torch.no_grad()
    def __call__(self, samples: Sequence[Sample], *, preference_scores: torch.Tensor | None = None) -> RewardBreakdown:
        """``preference_scores`` (N,): learned scores computed elsewhere (the RL roles' reward head on the
        shared trunk) used in place of the preference model."""
        cfg, n = self.cfg, len(samples)
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(n)
        if preference_scores is not None:
            parts["preference"] = preference_scores.float().cpu()
            total += cfg.preference_weight * parts["preference"]
        if (self.preference is not None and preference_scores is None) or self.rules is not None:
            seqs = pack_sequences([(s.prompt_ids + s.response_ids, len(s.prompt_ids)) for s in samples],
                                  self.seq_len, self.pad_id)
            if self.preference is not None and preference_scores is None:
                parts["preference"] = self._score(self.preference, seqs)[:, 0]
                total += cfg.preference_weight * parts["preference"]
            if self.rules is not None:
                parts["rule_compliance"] = (1 - torch.sigmoid(self._score(self.rules, seqs))).sum(-1)
                total += cfg.rules_weight * parts["rule_compliance"]
        if cfg.length_target is not None:
            L = cfg.length_target
            parts["length_excess"] = torch.tensor([max(0, len(s.response_ids) - L) / L for s in samples])
            total -= cfg.length_weight * parts["length_excess"]
        if self.format is not None:
            parts["format_valid"] = torch.tensor([self.format(s.prompt, s.response, s.answer) for s in samples])
            total += cfg.format_weight * parts["format_valid"]
        for name, fn in self.functions.items():
            if getattr(fn, "on_samples", False):  # sees token ids too: fn(sample) -> float
                parts[name] = torch.tensor([float(fn(s)) for s in samples])
            else:
                parts[name] = torch.tensor([float(fn(s.prompt, s.response, s.answer)) for s in samples])
            total += cfg.functions[name] * parts[name]
        return RewardBreakdown(total, parts)

    def _score(self, model: ScoreModel, seqs: Sequences) -> torch.Tensor:
        device = next(model.parameters()).device
        s = seqs.to(device)
        return s.read_score(model(s.input_ids, document_ids=s.document_ids), model.pooling).float().cpu()  # (N, outputs)
