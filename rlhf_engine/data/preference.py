"""Comparison data for reward, preference and rule models and for DPO: rows, tokenization, batches.

Row formats (JSONL or Parquet; docs/data.md has examples):

    ranking   {"prompt": P, "responses": [r1, ..., rK], "ranking": [1, 3, 2, 3]}   K = 2..9, 1 = best,
              equal numbers tie; or the pairwise special case {"prompt": P, "chosen": c, "rejected": r}
              Soft labels (an AI labeler's probabilities, Bai et al. 2022): "soft_labels": [[i, j, p], ...]
              on a ranking row (p = P(response i is preferred to response j)), "soft_label": p on a
              pairwise row (p = P(chosen is preferred)); a row with soft labels may rank all responses equal
    choice    {"prompt": P, "responses": [r1, ..., rN], "chosen": i}                 Sparrow pick-one-of-N
    rules     {"messages": [...], "labels": {"rule_name": true | false | "unsure"}}  true = violated;
              or one label per row: {"messages": [...], "rule": "rule_name", "violated": ...}

A prompt P is either a list of chat messages (conversational: prompt and response are rendered with the
tokenizer's chat template, the response as an assistant turn) or a string (plain text: response tokens
follow the prompt's, and end with EOS). Plain text is tokenized as TRL does, so the same rows give the
same tokens in both: the EOS string is appended to the response, ``prompt`` and ``prompt + response``
are tokenized, and their common prefix is the prompt.

Every response of a prompt is a separate sequence forwarded once; pairs, choices and labels index into
the micro-batch's sequences. Sequences are packed into rows (``Sequences``) like SFT data.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence, Union

import torch

from .chat import Message, render_ids, parse_conversation
from .packing import IGNORE_INDEX, PAD_DOCUMENT, Example, next_token_example, pack

Prompt = Union[list[Message], str]
MAX_RANKED = 9


# ---------------------------------------------------------------------------------------------- rows


def parse_prompt(value: Any) -> Prompt:
    if isinstance(value, str):
        if not value:
            raise ValueError("'prompt' is an empty string")
        return value
    if isinstance(value, list):
        messages = parse_conversation({"messages": value + [{"role": "assistant", "content": ""}]})[:-1]
        if messages[-1].role == "assistant":
            raise ValueError("a conversational 'prompt' must end with a user (or system) message")
        return messages
    raise ValueError(f"'prompt' must be a string or a list of messages, got {type(value).__name__}")


def _response(value: Any, where: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant":
        value = value[0].get("content")  # TRL's conversational completion: [{"role": "assistant", ...}]
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string")
    return value


def _keys(row: Any, required: set[str], optional: set[str] = set()) -> None:
    if not isinstance(row, dict):
        raise ValueError("row must be a JSON object")
    missing, extra = required - set(row), set(row) - required - optional
    if missing:
        raise ValueError(f"missing key(s) {sorted(missing)}")
    if extra:
        raise ValueError(f"unknown key(s) {sorted(extra)}")


@dataclass(frozen=True)
class Ranking:
    """K responses to one prompt, ranked: ``ranks[i]`` is response i's rank (1 = best, equal = tie)."""

    prompt: Prompt
    responses: tuple[str, ...]
    ranks: tuple[int, ...]
    soft: tuple[tuple[int, int, float], ...] | None = None  # (i, j, P(i preferred to j)) per labelled pair

    def pairs(self) -> list[tuple[int, int]]:
        """(winner, loser) for each of the C(K, 2) pairs whose ranks differ; tied pairs are dropped."""
        K = len(self.responses)
        return [(i, j) if self.ranks[i] < self.ranks[j] else (j, i)
                for i in range(K) for j in range(i + 1, K) if self.ranks[i] != self.ranks[j]]

    def labelled_pairs(self, soft: bool = True) -> list[tuple[int, int, float]]:
        """(winner, loser, target probability that the winner is preferred): the soft labels oriented so
        the target is >= 0.5 (a 0.5 pair is kept: it asks for equal scores), or the hard pairs at 1.0."""
        if soft and self.soft is not None:
            return [(i, j, p) if p >= 0.5 else (j, i, 1.0 - p) for i, j, p in self.soft]
        return [(w, lo, 1.0) for w, lo in self.pairs()]


def scores_to_ranking(scores: Sequence[float], decimals: int = 6) -> list[int]:
    """Dense ranks, 1 = highest score; scores equal after rounding tie."""
    rounded = [round(float(s), decimals) for s in scores]
    order = sorted(set(rounded), reverse=True)
    return [order.index(s) + 1 for s in rounded]


def _probability(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _soft_labels(value: Any, K: int) -> tuple[tuple[int, int, float], ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("'soft_labels' must be a non-empty list of [i, j, p] (p = P(response i preferred to j))")
    out, seen = [], set()
    for n, entry in enumerate(value):
        if (not isinstance(entry, list) or len(entry) != 3
                or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < K for x in entry[:2])
                or entry[0] == entry[1]):
            raise ValueError(f"'soft_labels'[{n}] must be [i, j, p] with i != j indices into 'responses' "
                             f"(0..{K - 1}), got {entry!r}")
        i, j = entry[0], entry[1]
        if (min(i, j), max(i, j)) in seen:
            raise ValueError(f"'soft_labels'[{n}]: the pair ({i}, {j}) is labelled twice")
        seen.add((min(i, j), max(i, j)))
        out.append((i, j, _probability(entry[2], f"'soft_labels'[{n}][2]")))
    return tuple(out)


def parse_ranking(row: Any) -> Ranking:
    if isinstance(row, dict) and "chosen" in row and "responses" not in row:
        _keys(row, {"prompt", "chosen", "rejected"}, {"soft_label"})
        pair = (_response(row["chosen"], "'chosen'"), _response(row["rejected"], "'rejected'"))
        _distinct(pair, ("'chosen'", "'rejected'"))
        soft = ((0, 1, _probability(row["soft_label"], "'soft_label'")),) if "soft_label" in row else None
        return Ranking(parse_prompt(row["prompt"]), pair, (1, 2), soft)
    _keys(row, {"prompt", "responses", "ranking"}, {"soft_labels"})
    responses, ranks = row["responses"], row["ranking"]
    if not isinstance(responses, list) or not 2 <= len(responses) <= MAX_RANKED:
        raise ValueError(f"'responses' must be a list of 2..{MAX_RANKED} strings")
    if not isinstance(ranks, list) or len(ranks) != len(responses):
        raise ValueError(f"'ranking' must be a list with one rank per response ({len(responses)}), "
                         f"got {ranks!r}")
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise ValueError(f"'ranking' entries must be integers >= 1 (1 = best), got {ranks!r}")
    soft = _soft_labels(row["soft_labels"], len(responses)) if "soft_labels" in row else None
    if len(set(ranks)) == 1 and soft is None:
        raise ValueError("all responses are tied: the ranking gives no preference pair")
    texts = tuple(_response(r, f"'responses'[{i}]") for i, r in enumerate(responses))
    _distinct(texts, [f"'responses'[{i}]" for i in range(len(texts))])
    return Ranking(parse_prompt(row["prompt"]), texts, tuple(ranks), soft)


def _distinct(texts, names) -> None:
    """Refuse the same response twice in one comparison: ranked apart it contradicts itself, ranked
    together it only adds a tie; either way the labeler's file should say it once."""
    seen: dict[str, str] = {}
    for text, name in zip(texts, names):
        key = " ".join(str(text).split())
        if key in seen:
            raise ValueError(f"{seen[key]} and {name} are the same response; keep one (a tie is no preference)")
        seen[key] = name


@dataclass(frozen=True)
class Choice:
    """N candidate responses to one prompt and the one the labeler picked."""

    prompt: Prompt
    responses: tuple[str, ...]
    chosen: int


def parse_choice(row: Any) -> Choice:
    _keys(row, {"prompt", "responses", "chosen"})
    responses, chosen = row["responses"], row["chosen"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise ValueError("'responses' must be a list of at least 2 strings")
    if not isinstance(chosen, int) or isinstance(chosen, bool) or not 0 <= chosen < len(responses):
        raise ValueError(f"'chosen' must be an index into 'responses' (0..{len(responses) - 1}), got {chosen!r}")
    return Choice(parse_prompt(row["prompt"]),
                  tuple(_response(r, f"'responses'[{i}]") for i, r in enumerate(responses)), chosen)


@dataclass(frozen=True)
class RuleLabels:
    """A dialogue and, per rule, whether it violates it ("unsure" labels are dropped when parsing)."""

    dialogue: tuple[Message, ...]
    labels: tuple[tuple[str, bool], ...]


def rule_parser(rules: Sequence[str]):
    """A row parser for rule labels over the rule names ``rules``."""
    known = set(rules)

    def label(value: Any, rule: str) -> bool | None:
        if value == "unsure" or value is None:
            return None
        if not isinstance(value, bool):
            raise ValueError(f"label of rule {rule!r} must be true (violated), false or \"unsure\", got {value!r}")
        return value

    def parse(row: Any) -> RuleLabels:
        if isinstance(row, dict) and "rule" in row:
            _keys(row, {"messages", "rule", "violated"})
            raw = {row["rule"]: row["violated"]}
        else:
            _keys(row, {"messages", "labels"})
            raw = row["labels"]
            if not isinstance(raw, dict) or not raw:
                raise ValueError("'labels' must be a non-empty object {rule: true | false | \"unsure\"}")
        unknown = [r for r in raw if r not in known]
        if unknown:
            raise ValueError(f"unknown rule(s) {unknown}; algorithm.rules.names lists {sorted(known)}")
        messages = tuple(parse_conversation({"messages": row["messages"]}))
        labels = tuple((r, v) for r, v in ((r, label(v, r)) for r, v in raw.items()) if v is not None)
        return RuleLabels(messages, labels)

    return parse


# ---------------------------------------------------------------------------------------------- tokens


def tokenize_response(tokenizer, prompt: Prompt, response: str) -> tuple[list[int], int]:
    """Token ids of prompt + response and the number of prompt tokens (see the module docstring)."""
    if isinstance(prompt, str):
        eos = tokenizer.eos_token or ""
        text = response if response.endswith(eos) else response + eos
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        full = list(tokenizer(prompt + text)["input_ids"])
        n = 0
        while n < min(len(prompt_ids), len(full)) and prompt_ids[n] == full[n]:
            n += 1
        return full, n
    head = render_ids(tokenizer, prompt, add_generation_prompt=True)
    full = render_ids(tokenizer, list(prompt) + [Message("assistant", response)], add_generation_prompt=False)
    if full[: len(head)] != head:
        raise ValueError("the chat template does not render prompt + response prefix-consistently")
    return full, len(head)


def tokenize_dialogue(tokenizer, dialogue: Sequence[Message]) -> list[int]:
    return render_ids(tokenizer, list(dialogue), add_generation_prompt=False)


# ---------------------------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Sequences:
    """R sequences packed into B rows of S tokens (documents never attend to each other).

    ``labels`` hold the next token on response tokens only (IGNORE_INDEX elsewhere), for log-probs;
    ``seq_index`` maps each position to its sequence (-1 on padding); ``last`` is the flat index
    (b * S + s) of each sequence's last token, where a score is read.
    """

    input_ids: torch.Tensor  # (B, S)
    document_ids: torch.Tensor  # (B, S)
    labels: torch.Tensor  # (B, S)
    seq_index: torch.Tensor  # (B, S)
    last: torch.Tensor  # (R,)

    @property
    def num_sequences(self) -> int:
        return int(self.last.numel())

    @property
    def num_tokens(self) -> int:
        return int((self.document_ids != PAD_DOCUMENT).sum())

    def to(self, device) -> "Sequences":
        return Sequences(*(t.to(device) for t in (self.input_ids, self.document_ids, self.labels, self.seq_index, self.last)))

    def read_last(self, per_position: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (R, ...): the values at each sequence's last token."""
        return per_position.flatten(0, 1)[self.last]

    def response_positions(self) -> torch.Tensor:
        """(B, S) bool: the positions of response tokens (those a label points at: labels[t] is token t + 1)."""
        response = torch.zeros_like(self.labels, dtype=torch.bool)
        response[:, 1:] = self.labels[:, :-1] != IGNORE_INDEX
        return response

    def mean_over_responses(self, per_position: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (R, ...): the mean over each sequence's response tokens (0 for a sequence without)."""
        weight = self.response_positions().to(per_position.dtype)  # (B, S)
        weight = weight.reshape(*weight.shape, *[1] * (per_position.dim() - 2))
        idx = self.seq_index.flatten()
        keep = idx >= 0
        flat = (per_position * weight).flatten(0, 1)[keep]  # (kept, ...)
        summed = flat.new_zeros(self.num_sequences, *per_position.shape[2:]).index_add(0, idx[keep], flat)
        counts = weight.flatten(0, 1)[keep].new_zeros(self.num_sequences, *weight.shape[2:]).index_add(
            0, idx[keep], weight.flatten(0, 1)[keep])
        return summed / counts.clamp(min=1)

    def read_score(self, per_position: torch.Tensor, pooling: str = "last") -> torch.Tensor:
        """(B, S, ...) -> (R, ...): a score model's per-sequence score, read at the last token or averaged
        over the response tokens (``pooling`` of the score model)."""
        if pooling == "last":
            return self.read_last(per_position)
        if pooling == "mean":
            return self.mean_over_responses(per_position)
        raise ValueError(f"unknown score pooling {pooling!r}; expected 'last' or 'mean'")

    def sum_per_sequence(self, per_token: torch.Tensor) -> torch.Tensor:
        """(B, S) -> (R,): sums over each sequence's positions (padding excluded)."""
        idx = self.seq_index.flatten()
        keep = idx >= 0
        out = per_token.new_zeros(self.num_sequences)
        return out.index_add(0, idx[keep], per_token.flatten()[keep])

    def count_per_sequence(self) -> torch.Tensor:
        """(R,) number of target (response) tokens of each sequence."""
        return self.sum_per_sequence((self.labels != IGNORE_INDEX).float())


def pack_sequences(seqs: Sequence[tuple[list[int], int]], seq_len: int, pad_id: int) -> Sequences:
    """Pack (ids, n_prompt) sequences first-fit into rows of ``seq_len`` (longer ones are truncated)."""
    examples = [next_token_example(ids, [t >= n_prompt for t in range(len(ids))], seq_len) for ids, n_prompt in seqs]
    rows = pack(examples, seq_len)
    B = len(rows)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
    document_ids = torch.full((B, seq_len), PAD_DOCUMENT, dtype=torch.long)
    seq_index = torch.full((B, seq_len), -1, dtype=torch.long)
    last = torch.empty(len(examples), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for doc, i in enumerate(row):
            ex: Example = examples[i]
            n = len(ex.input_ids)
            input_ids[b, t : t + n] = torch.tensor(ex.input_ids)
            labels[b, t : t + n] = torch.tensor(ex.labels)
            document_ids[b, t : t + n] = doc
            seq_index[b, t : t + n] = i
            last[i] = b * seq_len + t + n - 1
            t += n
    return Sequences(input_ids, document_ids, labels, seq_index, last)


class _OverSequences:
    """Shared by the batches below: device move of every tensor field."""

    seqs: Sequences

    def to(self, device):
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass(frozen=True)
class PairBatch(_OverSequences):
    """Preference pairs over packed sequences: sequence ``chosen[m]`` is preferred to ``rejected[m]``.
    Used by the ranking RM (all pairs of each prompt's K responses) and by DPO.

    ``prompt_weight[m]`` = 1 / C(K, 2) for a pair of a prompt with K responses: InstructGPT's weighting,
    under which each prompt's comparisons count as one batch element (tied pairs are dropped, and their
    share is not handed to the others). ``target[m]`` is the probability that ``chosen[m]`` is preferred:
    1 for a hard label, the AI labeler's soft label (>= 0.5) otherwise."""

    seqs: Sequences
    chosen: torch.Tensor  # (M,) long
    rejected: torch.Tensor  # (M,) long
    prompt_weight: torch.Tensor  # (M,) float, 1 / C(K, 2) of the pair's prompt
    prompts: torch.Tensor  # () long: prompts with at least one pair
    target: torch.Tensor  # (M,) float, P(chosen preferred): 1.0 for hard labels

    def counts(self) -> dict[str, int]:
        return {"tokens": self.seqs.num_tokens, "pairs": int(self.chosen.numel()), "prompts": int(self.prompts)}


def pair_batch(tokenized: Sequence[tuple[list[tuple[list[int], int]], Sequence[tuple]]], seq_len: int,
               pad_id: int) -> PairBatch:
    """``tokenized``: per prompt, its responses' (ids, n_prompt) and (winner, loser) or (winner, loser,
    target) pairs of indices."""
    seqs, chosen, rejected, weight, target = [], [], [], [], []
    prompts = 0
    for responses, pairs in tokenized:
        base = len(seqs)
        seqs += responses
        chosen += [base + p[0] for p in pairs]
        rejected += [base + p[1] for p in pairs]
        target += [p[2] if len(p) > 2 else 1.0 for p in pairs]
        K = len(responses)
        weight += [2.0 / (K * (K - 1))] * len(pairs)
        prompts += bool(pairs)
    return PairBatch(pack_sequences(seqs, seq_len, pad_id), torch.tensor(chosen, dtype=torch.long),
                     torch.tensor(rejected, dtype=torch.long), torch.tensor(weight, dtype=torch.float32),
                     torch.tensor(prompts), torch.tensor(target, dtype=torch.float32))


@dataclass(frozen=True)
class ChoiceBatch(_OverSequences):
    """Pick-one-of-N: ``options[p]`` are prompt p's candidate sequences (-1 pads ragged N), and
    ``chosen[p]`` the column of the picked one."""

    seqs: Sequences
    options: torch.Tensor  # (P, N) long
    chosen: torch.Tensor  # (P,) long

    def counts(self) -> dict[str, int]:
        return {"tokens": self.seqs.num_tokens, "prompts": int(self.chosen.numel())}


def choice_batch(prompts: Sequence[list[tuple[list[int], int]]], chosen: Sequence[int], seq_len: int,
                 pad_id: int) -> ChoiceBatch:
    seqs: list[tuple[list[int], int]] = []
    N = max(len(p) for p in prompts)
    options = torch.full((len(prompts), N), -1, dtype=torch.long)
    for p, responses in enumerate(prompts):
        options[p, : len(responses)] = torch.arange(len(seqs), len(seqs) + len(responses))
        seqs += responses
    return ChoiceBatch(pack_sequences(seqs, seq_len, pad_id), options, torch.tensor(list(chosen)))


@dataclass(frozen=True)
class RuleBatch(_OverSequences):
    """Dialogues with per-rule violation labels; ``mask`` is False where a rule is unlabeled or unsure."""

    seqs: Sequences
    labels: torch.Tensor  # (R, n_rules) float, 1 = violated
    mask: torch.Tensor  # (R, n_rules) bool

    def counts(self) -> dict[str, int]:
        """``labels``: labeled (dialogue, rule) entries, what the BCE averages over."""
        return {"tokens": self.seqs.num_tokens, "labels": int(self.mask.sum())}


def rule_batch(dialogues: Sequence[list[int]], labels: Sequence[RuleLabels], rules: Sequence[str], seq_len: int,
               pad_id: int) -> RuleBatch:
    column = {r: i for i, r in enumerate(rules)}
    y = torch.zeros(len(dialogues), len(rules))
    mask = torch.zeros(len(dialogues), len(rules), dtype=torch.bool)
    for i, row in enumerate(labels):
        for rule, violated in row.labels:
            y[i, column[rule]], mask[i, column[rule]] = float(violated), True
    return RuleBatch(pack_sequences([(ids, 0) for ids in dialogues], seq_len, pad_id), y, mask)
