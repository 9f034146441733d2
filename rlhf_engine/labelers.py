"""Labelers for iterated RLHF: who ranks the K responses sampled from the current policy.

    labeler = build_labeler(cfg, tokenizer)
    ranking = labeler.rank(prompt_row, responses)     # [1, 3, 2, 2]: 1 = best, equal numbers tie

- ``ProgrammaticLabeler``: a weighted sum of registered reward functions (``reward.functions``) plus
  Gaussian noise (``iterate.label_noise``, simulated labeler disagreement); scores that round equal tie.
- ``ModelLabeler`` (AI feedback, Bai et al. 2022): a causal LM reads ``iterate.labeler_template`` filled
  with prompt and response and scores log p(" Yes") - log p(" No") for its next token.
- ``FileLabeler`` (people): the round's responses are written to ``to_label.jsonl`` as ranking rows
  without a ranking; the run stops with ``LabelsPending`` naming the file to write, ``labels.jsonl`` in
  the ranking format of docs/data.md; rerunning the same command reads it and continues.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Protocol, Sequence

import torch

from .config import RunConfig
from .data.preference import parse_ranking, scores_to_ranking
from .data.prompts import PromptRow
from .data.reader import read_rows
from .models import load_hf_model, load_tokenizer
from .rewards import REWARD_FUNCTIONS


class LabelsPending(RuntimeError):
    """Human labels are needed before the run can continue."""


class Labeler(Protocol):
    def rank_all(self, rows: Sequence[PromptRow], responses: Sequence[Sequence[str]]) -> list[list[int]]: ...


class ProgrammaticLabeler:
    def __init__(self, weights: dict[str, float], noise: float = 0.0, seed: int = 0) -> None:
        if not weights:
            raise ValueError("the programmatic labeler scores with reward.functions; none are set")
        self.functions = {name: (REWARD_FUNCTIONS[name], w) for name, w in weights.items()}
        self.noise, self.rng = noise, random.Random(seed)

    def score(self, row: PromptRow, response: str) -> float:
        return sum(w * float(fn(row.text, response, row.answer)) for fn, w in self.functions.values())

    def rank_all(self, rows, responses):
        out = []
        for row, ys in zip(rows, responses):
            out.append(scores_to_ranking([self.score(row, y) + self.rng.gauss(0.0, self.noise) if self.noise else
                                          self.score(row, y) for y in ys]))
        return out


class ModelLabeler:
    def __init__(self, model_path: str, template: str, device: str | torch.device = "cpu") -> None:
        self.model = load_hf_model(model_path).to(device).eval()
        self.tok = load_tokenizer(model_path)
        self.template, self.device = template, device
        yes, no = self.tok(" Yes")["input_ids"], self.tok(" No")["input_ids"]
        self.yes, self.no = yes[0], no[0]  # the first token of each answer

    @torch.no_grad()
    def score(self, row: PromptRow, response: str) -> float:
        ids = self.tok(self.template.format(prompt=row.text, response=response))["input_ids"]
        hidden = self.model(torch.tensor([ids], device=self.device))[0, -1]  # (D,)
        logp = torch.log_softmax(hidden.float() @ self.model.output_weight.float().T, dim=-1)
        return float(logp[self.yes] - logp[self.no])

    def rank_all(self, rows, responses):
        return [scores_to_ranking([self.score(row, y) for y in ys]) for row, ys in zip(rows, responses)]


class FileLabeler:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def rank_all(self, rows, responses):
        labels = self.dir / "labels.jsonl"
        if not labels.exists():
            todo = self.dir / "to_label.jsonl"
            with todo.open("w") as f:
                for row, ys in zip(rows, responses):
                    prompt = row.prompt if isinstance(row.prompt, str) else [m.__dict__ for m in row.prompt]
                    f.write(json.dumps({"prompt": prompt, "responses": list(ys)}) + "\n")
            raise LabelsPending(f"rank the responses in {todo} and write them, with a 'ranking' per row "
                                f"(1 = best, docs/data.md), to {labels}; then run the same command again")
        ranked = read_rows(labels, parse_ranking)
        if len(ranked) != len(rows):
            raise LabelsPending(f"{labels} has {len(ranked)} rows; {len(rows)} were asked for in to_label.jsonl")
        return [list(r.ranks) for r in ranked]


def build_labeler(cfg: RunConfig, round_dir: Path, round_index: int, device="cpu") -> Labeler:
    it = cfg.iterate
    if it.labeler == "programmatic":
        return ProgrammaticLabeler(cfg.reward.functions, it.label_noise, cfg.trainer.seed * 1009 + round_index)
    if it.labeler == "model":
        return ModelLabeler(it.labeler_model_path, it.labeler_template, device)
    return FileLabeler(round_dir)
