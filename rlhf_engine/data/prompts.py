"""Prompt sets for online RL: rows, and their tokens for sampling.

Row formats (JSONL or Parquet):

    {"prompt": P}                         P a string (plain text) or a list of chat messages
    {"prompt": P, "answer": "42"}         a reference answer for programmatic rewards (exact_match, ...)
    {"messages": [...]}                   a chat demonstration: the prompt is everything before the first
                                          assistant turn, whose content becomes the answer

so SFT data (and the built-in demo set) doubles as a prompt set. Chat prompts are rendered with the
tokenizer's chat template and its generation prompt; plain text is tokenized as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import RunConfig
from .builtin import demo_conversations
from .chat import Message, render_ids, parse_conversation, prompt_ids
from .preference import Prompt, parse_prompt
from .streams import load_split


@dataclass(frozen=True)
class PromptRow:
    prompt: Prompt
    answer: str | None = None

    @property
    def text(self) -> str:
        """The last user message (chat) or the prompt itself: what programmatic rewards read."""
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[-1].content


@dataclass(frozen=True)
class PromptItem:
    """A prompt to sample from: its tokens (chat template applied, generation prompt included), its text for
    programmatic rewards, and an optional reference answer."""

    ids: list[int]
    text: str
    answer: str | None = None
    chat: bool = False  # rendered with the chat template (its end-of-turn suffix follows a finished response)


def template_suffix(tokenizer) -> list[int]:
    """Tokens the chat template puts after the EOS that ends an assistant turn (e.g. a newline after
    ``<|im_end|>``). A reward model trained on rendered conversations reads its score there, so sampled
    responses that stopped get them appended before scoring."""
    ids = render_ids(tokenizer, [Message("user", "a"), Message("assistant", "b")], add_generation_prompt=False)
    eos = tokenizer.eos_token_id
    if eos is None or eos not in ids:
        return []
    last = len(ids) - 1 - ids[::-1].index(eos)
    return ids[last + 1 :]


def parse_prompt_row(row: Any) -> PromptRow:
    if not isinstance(row, dict):
        raise ValueError(f"a prompt row must be a JSON object, got {type(row).__name__}")
    if "messages" in row and "prompt" not in row:
        conv = parse_conversation(row)
        first = next((i for i, m in enumerate(conv) if m.role == "assistant"), None)
        if first is None or first == 0:
            raise ValueError("a 'messages' row needs a user turn followed by an assistant turn")
        return PromptRow(conv[:first], conv[first].content)
    unknown = set(row) - {"prompt", "answer"}
    if "prompt" not in row or unknown:
        raise ValueError(f"expected keys 'prompt' (and optional 'answer') or 'messages', got {sorted(row)}")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"'answer' must be a string, got {type(answer).__name__}")
    return PromptRow(parse_prompt(row["prompt"]), answer)


def prompt_item(tokenizer, row: PromptRow, max_tokens: int | None = None) -> PromptItem:
    """Tokens to condition on; a prompt longer than ``max_tokens`` keeps its last tokens."""
    chat = not isinstance(row.prompt, str)
    ids = prompt_ids(tokenizer, list(row.prompt)) if chat else list(tokenizer(row.prompt)["input_ids"])
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[-max_tokens:]
    return PromptItem(ids, row.text, row.answer, chat)


def prompt_texts(row: PromptRow) -> list[str]:
    texts = [row.prompt] if isinstance(row.prompt, str) else [m.content for m in row.prompt]
    return texts + ([row.answer] if row.answer else [])


__all__ = ["Message", "PromptItem", "PromptRow", "parse_prompt_row", "prompt_item", "prompt_texts", "template_suffix"]


def load_prompt_rows(cfg: RunConfig) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train, held-out) prompt rows: files, or the built-in demo set's prompts and answers."""
    return load_split(cfg, parse_prompt_row, lambda: [parse_prompt_row(r) for r in
                                                       demo_conversations(cfg.data.builtin_rows, seed=cfg.trainer.seed)])
