"""Comparison data for reward models and DPO: rankings, pick-one-of-N choices and rule labels as
micro-batches, each response tokenized once and forwarded once.

    batcher = RowBatcher(cfg, tokenizer, rows, "pairs")   # or "choice" (Sparrow), "rules"
    stream = batcher.stream()                             # the seeded, resumable training order
    held_out = batcher.fixed(limit)                        # every row in order, for evaluation
"""

from __future__ import annotations

import random
from typing import Sequence

from ..config import RunConfig
from .chat import pad_id, row_texts
from .preference import (
    Choice,
    Ranking,
    RuleLabels,
    choice_batch,
    pair_batch,
    rule_batch,
    tokenize_dialogue,
    tokenize_response,
)
from .reader import DataError
from .streams import BatchStream, shuffled


def texts_of(rows: Sequence[Ranking | Choice | RuleLabels]):
    """Raw texts, for fitting a scratch tokenizer."""
    for row in rows:
        if isinstance(row, RuleLabels):
            yield from row_texts(list(row.dialogue))
        else:
            yield from row_texts(row.prompt)
            yield from row.responses


def chunks(order: list[int], size: int) -> list[list[int]]:
    """Consecutive groups of ``size`` (a partial last group is dropped)."""
    return [order[i : i + size] for i in range(0, len(order) - size + 1, size)]


class RowBatcher:
    """Turns rows of one format into micro-batches: tokenizes once, then packs on demand."""

    def __init__(self, cfg: RunConfig, tokenizer, rows: list, kind: str) -> None:
        """``kind``: 'pairs' (ranking rows -> PairBatch), 'choice' (-> ChoiceBatch), 'rules' (-> RuleBatch)."""
        self.cfg, self.tok, self.rows, self.kind = cfg, tokenizer, rows, kind
        self.seq_len, self.pad = cfg.data.seq_len, pad_id(tokenizer)
        if kind == "pairs":
            soft = cfg.algorithm.name == "rm" and cfg.algorithm.rm.soft_labels  # DPO trains on the hard ranking
            self.tokens = [([tokenize_response(tokenizer, r.prompt, y) for y in r.responses], r.labelled_pairs(soft))
                           for r in rows]
        elif kind == "choice":
            self.tokens = [[tokenize_response(tokenizer, r.prompt, y) for y in r.responses] for r in rows]
        else:
            self.tokens = [tokenize_dialogue(tokenizer, r.dialogue) for r in rows]

    def plan(self, order: list[int], rng: random.Random) -> list[tuple[int, list[tuple[int, int]]]]:
        """Per row: its index and (sparrow) the distractors, (row, response) pairs from other rows."""
        extra = self.cfg.algorithm.sparrow.extra_negatives if self.kind == "choice" else 0
        n = len(self.rows)
        if extra and n < 2:
            raise DataError("sparrow distractors come from other prompts: need at least 2 rows")
        out = []
        for i in order:
            negatives = []
            for _ in range(extra):
                j = rng.randrange(n - 1)
                j += j >= i  # any row but this one
                negatives.append((j, rng.randrange(len(self.rows[j].responses))))
            out.append((i, negatives))
        return out

    def build(self, plan: list[tuple[int, list[tuple[int, int]]]]):
        if self.kind == "pairs":
            return pair_batch([self.tokens[i] for i, _ in plan], self.seq_len, self.pad)
        if self.kind == "choice":
            options = [self.tokens[i] + [tokenize_response(self.tok, self.rows[i].prompt, self.rows[j].responses[k])
                                         for j, k in neg] for i, neg in plan]
            return choice_batch(options, [self.rows[i].chosen for i, _ in plan], self.seq_len, self.pad)
        return rule_batch([self.tokens[i] for i, _ in plan], [self.rows[i] for i, _ in plan],
                          self.cfg.algorithm.rules.names, self.seq_len, self.pad)

    def stream(self) -> BatchStream:
        seed, mbs = self.cfg.trainer.seed, self.cfg.trainer.micro_batch_size

        def plan_epoch(epoch: int):
            rng = random.Random(seed * 7_919 + epoch)
            return [self.plan(group, rng) for group in chunks(shuffled(len(self.rows), seed, epoch), mbs)]

        return BatchStream(plan_epoch, self.build)

    def fixed(self, limit: int | None = None) -> list:
        """Every row in order (held-out evaluation), distractors drawn once from a fixed seed."""
        rng = random.Random(self.cfg.trainer.seed - 1)
        mbs = self.cfg.trainer.micro_batch_size
        groups = [list(range(i, min(i + mbs, len(self.rows)))) for i in range(0, len(self.rows), mbs)]
        return [self.build(self.plan(g, rng)) for g in groups[:limit]]
