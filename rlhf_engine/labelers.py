"""Labelers for iterated RLHF: who ranks the K responses sampled from the current policy.

    labeler = build_labeler(cfg, tokenizer)
    rankings = labeler.rank_all(prompt_rows, responses)   # per prompt [1, 3, 2, 2]: 1 = best, equal tie
    labels = labeler.label_all(prompt_rows, responses)    # per prompt {"ranking": ..., "soft_labels": ...}
                                                          # (the ranking-row fields; None: no label)

- ``ProgrammaticLabeler``: a weighted sum of registered reward functions (``reward.functions``) plus
  Gaussian noise (``iterate.label_noise``, simulated labeler disagreement); scores that round equal tie.
- ``ModelLabeler`` (AI feedback, Bai et al. 2022): a causal LM reads ``iterate.labeler_template`` filled
  with prompt and response and scores log p(" Yes") - log p(" No") for its next token.
- ``AILabeler`` (RLAIF, Bai et al. 2022, "Constitutional AI" sec. 4): a judge answers the constitution's
  comparison questions (``data/constitution.py``) about the responses; the judge's probabilities of the
  choice letters, normalised over the letters shown, become soft labels P(i preferred to j), averaged over
  both orders of the options and over the sampled principles. The judge may instead be a reward model:
  P(i preferred to j) = sigmoid(r_i - r_j).
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

from .config import AILabelerConfig, RunConfig
from .data.chat import Message, pad_id, render_ids
from .data.constitution import ANSWER_PREFIX, CHOICE_LETTERS, Principle, comparison_prompt, load_constitution
from .data.preference import Prompt, pack_sequences, parse_ranking, scores_to_ranking, tokenize_response
from .data.prompts import PromptRow
from .data.reader import read_rows
from .models import load_hf_model, load_tokenizer
from .models.score import load_score_model
from .rewards import REWARD_FUNCTIONS
from .rollout.sampling import full_logits


class LabelsPending(RuntimeError):
    """Human labels are needed before the run can continue."""


class Labeler(Protocol):
    def rank_all(self, rows: Sequence[PromptRow], responses: Sequence[Sequence[str]]) -> list[list[int]]: ...

    def label_all(self, rows: Sequence[PromptRow], responses: Sequence[Sequence[str]]) -> list[dict | None]: ...


class _HardLabels:
    """Labelers that rank: their ranking-row fields are the ranking alone."""

    def label_all(self, rows, responses):
        return [{"ranking": r} for r in self.rank_all(rows, responses)]


class ProgrammaticLabeler(_HardLabels):
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


class ModelLabeler(_HardLabels):
    def __init__(self, model_path: str, template: str, device: str | torch.device = "cpu") -> None:
        self.model = load_hf_model(model_path).to(device).eval()
        self.tok = load_tokenizer(model_path)
        self.template, self.device = template, device
        yes, no = self.tok(" Yes")["input_ids"], self.tok(" No")["input_ids"]
        self.yes, self.no = yes[0], no[0]  # the first token of each answer

    @torch.no_grad()
    def score(self, row: PromptRow, response: str) -> float:
        ids = self.tok(self.template.format(prompt=row.text, response=response))["input_ids"]
        hidden = self.model(torch.tensor([ids], device=self.device))[0, -1:]  # (1, D)
        logp = torch.log_softmax(full_logits(hidden, self.model.output_weight, self.model.config.final_logit_softcapping)[0], -1)
        return float(logp[self.yes] - logp[self.no])

    def rank_all(self, rows, responses):
        return [scores_to_ranking([self.score(row, y) for y in ys]) for row, ys in zip(rows, responses)]


class FileLabeler(_HardLabels):
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


def is_reward_model(path: str | Path) -> bool:
    """Whether an HF checkpoint is a sequence classifier (a reward-model export) rather than a causal LM."""
    config = Path(path) / "config.json"
    if not config.exists():
        raise ValueError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    return any(a.endswith("ForSequenceClassification") for a in json.loads(config.read_text()).get("architectures") or [])


def judge_input_ids(tokenizer, question: str) -> list[int]:
    """The judge's tokens: the question as a user turn of its chat template (plain text without one), then
    the answer prefix, so that the next token is the chosen letter."""
    prefix = tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "chat_template", None):
        return render_ids(tokenizer, [Message("user", question)], add_generation_prompt=True) + prefix
    return tokenizer(question)["input_ids"] + prefix


class AILabeler:
    """Soft preference labels from a judge (see the module docstring and ``config.AILabelerConfig``).

    Causal-LM judge, one question with options in the order ``o`` under principle ``c``: q_o,c = softmax
    over the shown letters of the judge's next-token logits (= p(letter) / sum of p(letters)). With both
    orders, a response's probability is the mean of its two, and principles are averaged:

        pairwise   P(i > j) = mean over principles c of (q_(i,j),c[A] + q_(j,i),c[B]) / 2
        kwise      q_i = mean over c and orders of the probability at i's letter; P(i > j) = q_i / (q_i + q_j)

    Reward-model judge: P(i > j) = sigmoid(r_i - r_j). The ranking written beside the soft labels orders
    responses by their mean soft win rate over the others (equal rates tie).

    ``stats``: questions asked, ``off_choice`` (the judge's most likely next token was not one of the
    letters shown: its answer would not parse as a choice), mean choice mass, questions dropped below
    ``min_choice_mass`` and prompts left without a label.
    """

    def __init__(self, cfg: AILabelerConfig, seed: int = 0, device: str | torch.device = "cpu",
                 micro_batch: int = 16) -> None:
        if cfg.judge_path is None:
            raise ValueError("the AI labeler needs rlaif.judge_path (a causal LM or a reward-model export)")
        self.cfg, self.device, self.micro_batch = cfg, device, micro_batch
        self.rng = random.Random(seed)
        self.tok = load_tokenizer(cfg.judge_path)
        self.reward_model = is_reward_model(cfg.judge_path)
        if self.reward_model:
            self.model = load_score_model(cfg.judge_path).to(device).eval()
            self.principles = ()
        else:
            if cfg.constitution_path is None:
                raise ValueError("a causal-LM judge asks the constitution's questions: set rlaif.constitution_path")
            constitution = load_constitution(cfg.constitution_path)
            constitution.require("comparison", use="the AI labeler")
            self.principles = constitution.principles
            if cfg.principles_per_comparison > len(self.principles):
                raise ValueError(f"rlaif.principles_per_comparison={cfg.principles_per_comparison} but "
                                 f"{cfg.constitution_path} has {len(self.principles)} principles")
            self.model = load_hf_model(cfg.judge_path).to(device).eval()
            self.letters = []
            for letter in CHOICE_LETTERS:
                ids = self.tok(letter, add_special_tokens=False)["input_ids"]
                if len(ids) != 1 or (self.tok.unk_token_id is not None and ids[0] == self.tok.unk_token_id):
                    raise ValueError(f"{cfg.judge_path}: the judge's tokenizer has no single token for the choice "
                                     f"letter {letter!r} (it encodes to {ids}); the AI labeler reads the letter's "
                                     "probability from one next-token distribution")
                self.letters.append(ids[0])
        self.stats = {"questions": 0, "off_choice": 0, "choice_mass_sum": 0.0, "dropped_low_mass": 0,
                      "too_long": 0, "unlabelled_prompts": 0}

    # -------------------------------------------------------------------------------------- judges

    @torch.no_grad()
    def choice_probabilities(self, questions: list[tuple[Prompt, Sequence[str], Principle]]) -> list[torch.Tensor | None]:
        """Per question (prompt, options in the order shown, principle): (K,) probabilities of the K letters
        shown, normalised over them; None for a question dropped (too long, or below min_choice_mass)."""
        out: list[torch.Tensor | None] = []
        limit = self.model.config.max_position_embeddings
        for start in range(0, len(questions), self.micro_batch):
            chunk = questions[start : start + self.micro_batch]
            ids = [judge_input_ids(self.tok, comparison_prompt(p, ys, c)) for p, ys, c in chunk]
            keep = [i for i, x in enumerate(ids) if len(x) <= limit]
            self.stats["too_long"] += len(ids) - len(keep)
            result: list[torch.Tensor | None] = [None] * len(chunk)
            if keep:
                seqs = pack_sequences([(ids[i], len(ids[i])) for i in keep], max(len(ids[i]) for i in keep),
                                      pad_id(self.tok)).to(self.device)
                hidden = seqs.read_last(self.model(seqs.input_ids, document_ids=seqs.document_ids))  # (N, D)
                probs = full_logits(hidden, self.model.output_weight,
                                    self.model.config.final_logit_softcapping).softmax(-1)  # (N, V) fp32
                for n, i in enumerate(keep):
                    K = len(chunk[i][1])
                    shown = probs[n, self.letters[:K]]  # (K,)
                    mass = float(shown.sum())
                    self.stats["questions"] += 1
                    self.stats["choice_mass_sum"] += mass
                    self.stats["off_choice"] += int(probs[n].argmax()) not in self.letters[:K]
                    if mass < self.cfg.min_choice_mass or mass <= 0.0:
                        self.stats["dropped_low_mass"] += 1
                        continue
                    result[i] = (shown / mass).cpu()
            out += result
        return out

    @torch.no_grad()
    def _reward_scores(self, row: PromptRow, ys: Sequence[str]) -> torch.Tensor:
        seqs = pack_sequences([tokenize_response(self.tok, row.prompt, y) for y in ys],
                              self.model.config.max_position_embeddings, pad_id(self.tok)).to(self.device)
        return seqs.read_score(self.model(seqs.input_ids, document_ids=seqs.document_ids)[..., 0],
                               self.model.pooling).float().cpu()  # (K,)

    # -------------------------------------------------------------------------------------- labels

    def _orders(self, K: int) -> list[list[int]]:
        return [list(range(K)), list(range(K))[::-1]] if self.cfg.both_orders else [list(range(K))]

    def soft_labels(self, rows: Sequence[PromptRow], responses: Sequence[Sequence[str]]) -> list[dict[tuple[int, int], float]]:
        """Per prompt: {(i, j): P(response i preferred to response j)} for i < j (pairs whose questions
        were all dropped are missing)."""
        if self.reward_model:
            out = []
            for row, ys in zip(rows, responses):
                r = self._reward_scores(row, ys)
                out.append({(i, j): float(torch.sigmoid(r[i] - r[j])) for i in range(len(ys)) for j in range(i + 1, len(ys))})
            return out
        # the questions: (prompt index, pair or None for kwise, order, principle)
        asked: list[tuple[int, tuple[int, int] | None, list[int]]] = []
        questions = []
        for p, (row, ys) in enumerate(zip(rows, responses)):
            groups = ([(i, j) for i in range(len(ys)) for j in range(i + 1, len(ys))]
                      if self.cfg.comparison == "pairwise" else [None])
            for pair in groups:
                shown = list(pair) if pair is not None else list(range(len(ys)))
                for principle in self.rng.sample(self.principles, self.cfg.principles_per_comparison):
                    for order in self._orders(len(shown)):
                        options = [shown[k] for k in order]  # response indices in the order shown
                        asked.append((p, pair, options))
                        questions.append((row.prompt, [ys[k] for k in options], principle))
        probs = self.choice_probabilities(questions)
        # per prompt and group: the per-response probabilities of each question asked about it
        collected: dict[tuple[int, tuple[int, int] | None], list[dict[int, float]]] = {}
        for (p, pair, options), q in zip(asked, probs):
            if q is not None:
                collected.setdefault((p, pair), []).append({k: float(q[n]) for n, k in enumerate(options)})
        out: list[dict[tuple[int, int], float]] = [{} for _ in rows]
        for (p, pair), answers in collected.items():
            mean = {k: sum(a[k] for a in answers) / len(answers) for k in answers[0]}
            if pair is not None:
                out[p][pair] = mean[pair[0]]
            else:
                K = len(responses[p])
                for i in range(K):
                    for j in range(i + 1, K):
                        out[p][(i, j)] = mean[i] / (mean[i] + mean[j]) if mean[i] + mean[j] > 0 else 0.5
        return out

    def label_all(self, rows, responses):
        labels = []
        for ys, soft in zip(responses, self.soft_labels(rows, responses)):
            if not soft:
                self.stats["unlabelled_prompts"] += 1
                labels.append(None)
                continue
            K = len(ys)
            wins = [0.0] * K
            seen = [0] * K
            for (i, j), p in soft.items():
                wins[i], wins[j] = wins[i] + p, wins[j] + 1.0 - p
                seen[i], seen[j] = seen[i] + 1, seen[j] + 1
            rate = [w / n if n else 0.5 for w, n in zip(wins, seen)]
            labels.append({"ranking": scores_to_ranking(rate),
                           "soft_labels": [[i, j, round(p, 6)] for (i, j), p in sorted(soft.items())]})
        return labels

    def rank_all(self, rows, responses):
        return [lab["ranking"] if lab is not None else None for lab in self.label_all(rows, responses)]

    def report(self) -> dict[str, float]:
        s = dict(self.stats)
        s["choice_mass_mean"] = s.pop("choice_mass_sum") / max(s["questions"], 1)
        return s


def build_labeler(cfg: RunConfig, round_dir: Path, round_index: int, device="cpu") -> Labeler:
    it = cfg.iterate
    if it.labeler == "programmatic":
        return ProgrammaticLabeler(cfg.reward.functions, it.label_noise, cfg.trainer.seed * 1009 + round_index)
    if it.labeler == "model":
        return ModelLabeler(it.labeler_model_path, it.labeler_template, device)
    if it.labeler == "ai":
        return AILabeler(cfg.rlaif, cfg.trainer.seed * 1009 + round_index, device)
    return FileLabeler(round_dir)
