"""Reward-model stages: InstructGPT's ranking RM, Sparrow's preference model and rule classifier.

    rlhf-engine rm --config configs/rm_tiny.yaml model.hf_path=runs/sft/hf data.train_path=rankings.jsonl
    rlhf-engine train --config configs/sparrow_pm.yaml        # algorithm.name: sparrow
    rlhf-engine train --config configs/rules.yaml             # algorithm.name: rules

The model is the SFT decoder cut at ``model.trunk_layers``: the trunk stays frozen and the upper layers
plus a linear score train (k = 0 trains the whole model). Data formats are in ``data/preference.py`` and
docs/data.md. Each micro-batch holds ``trainer.micro_batch_size`` rows with all their responses, each
forwarded once. The trained model is written as a Hugging Face sequence-classification checkpoint under
``<out_dir>/hf`` with the tokenizer; ``summary.json`` reports held-out accuracy before and after.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..algorithms.reward import choice_objective, ranking_objective, rule_objective
from ..config import RunConfig
from ..data.chat import row_texts
from ..data.preference import (
    Choice,
    Ranking,
    RuleLabels,
    choice_batch,
    pair_batch,
    parse_choice,
    parse_ranking,
    rule_batch,
    rule_parser,
    tokenize_dialogue,
    tokenize_response,
)
from ..data.reader import DataError, read_rows
from ..models.score import ScoreModel, save_score_model
from ..parallel.checkpoint import gather_model
from ..parallel.runtime import init_runtime
from ..trainer import BatchStream, Trainer
from .common import announce, base_model, build_tokenizer, open_run, pad_id, shuffled, split_rows, write_summary

PARSERS: dict[str, Callable[[RunConfig], Callable]] = {
    "rm": lambda cfg: parse_ranking,
    "sparrow": lambda cfg: parse_choice,
    "rules": lambda cfg: rule_parser(cfg.algorithm.rules.names),
}


def load_rows(cfg: RunConfig, parse: Callable) -> tuple[list, list]:
    """(train, held-out) rows parsed by ``parse``; a missing file or bad row names file and line."""
    d, name = cfg.data, cfg.algorithm.name
    if d.train_path is None:
        raise DataError(f"algorithm '{name}' needs data.train_path (row formats: docs/data.md)")
    train = read_rows(d.train_path, parse)
    if d.eval_path is not None:
        return train, read_rows(d.eval_path, parse)
    return split_rows(train, d.eval_fraction, cfg.trainer.seed)


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
            self.tokens = [([tokenize_response(tokenizer, r.prompt, y) for y in r.responses], r.pairs()) for r in rows]
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


KINDS = {"rm": "pairs", "sparrow": "choice", "rules": "rules"}
OBJECTIVES = {
    "rm": lambda cfg: ranking_objective,
    "sparrow": lambda cfg: choice_objective(cfg.algorithm.sparrow.bt_weight, cfg.algorithm.sparrow.reg_weight),
    "rules": lambda cfg: rule_objective,
}


@torch.no_grad()
def mean_response_score(model: ScoreModel, batches: list, device) -> float:
    """Mean score of every sequence in ``batches`` (the training responses), for normalisation."""
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        s = b.seqs.to(device)
        scores = s.read_last(model(s.input_ids, document_ids=s.document_ids)[..., 0])
        total, n = total + float(scores.sum()), n + scores.numel()
    return total / max(n, 1)


def run_reward_model(cfg: RunConfig) -> dict[str, Any]:
    """Train the reward, preference or rule model that ``algorithm.name`` names; export; summarize."""
    start = time.perf_counter()
    name = cfg.algorithm.name
    if name not in OBJECTIVES:
        raise ValueError(f"algorithm.name={name!r} is not a reward-model stage ({', '.join(OBJECTIVES)})")
    rt = init_runtime(cfg)
    out = open_run(cfg, rt)
    train_rows, eval_rows = load_rows(cfg, PARSERS[name](cfg))
    tokenizer = build_tokenizer(cfg, texts_of(train_rows), rt, out)
    labels = cfg.algorithm.rules.names if name == "rules" else None
    lm = base_model(cfg, tokenizer)
    model = ScoreModel.from_lm(lm, cfg.model.trunk_layers, len(labels) if labels else 1,
                               generator=torch.Generator().manual_seed(cfg.trainer.seed))
    del lm
    model = rt.parallelize(model, cfg)
    train, held_out = (RowBatcher(cfg, tokenizer, rows, KINDS[name]) for rows in (train_rows, eval_rows))
    announce(rt, name, model, f"{len(train_rows)} train / {len(eval_rows)} held-out rows")

    trainer = Trainer(cfg, rt, model, OBJECTIVES[name](cfg), train.stream(), name=name,
                      eval_batches=held_out.fixed(cfg.trainer.eval_batches))
    result = trainer.fit()
    summary: dict[str, Any] = {
        "algorithm": name, "steps": result["step"], "finished": result["finished"], "resumed": result["resumed"],
        "train_rows": len(train_rows), "heldout_rows": len(eval_rows),
        "heldout_accuracy_initial": result["first_eval"].get("eval_accuracy"),
        "heldout_accuracy": result["final_eval"].get("eval_accuracy"),
        "heldout_loss": result["final_eval"].get("eval_loss"),
    }
    if result["finished"]:
        if name == "rm" and cfg.algorithm.rm.normalize:
            shift = mean_response_score(model, train.fixed(), rt.device)
            model.bias -= shift
            summary["normalization_shift"] = shift
        plain = gather_model(model, lambda: ScoreModel(model.config, model.trunk_layers, model.num_outputs))
        if plain is not None:
            save_score_model(plain, Path(out) / "hf", tokenizer=tokenizer, labels=labels)
        rt.barrier()
        summary["export"] = str(Path(out) / "hf")
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    write_summary(rt, out, summary)
    return summary
