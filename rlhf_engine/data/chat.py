"""Chat conversations: validation, tokenization through the tokenizer's chat template, assistant masks.

The assistant mask marks the tokens a model should learn to produce: the tokens each assistant turn
adds to the rendered conversation. They are found by rendering prefixes: for assistant turn i,
``render(messages[:i], add_generation_prompt=True)`` must be a token prefix of
``render(messages[:i+1])``, and the difference is the turn (content plus the template's end-of-turn
marker). This works with any template that renders prefix-consistently (Llama 3, Qwen2, Mistral,
ChatML...) without special tags in the template; a template that is not prefix-consistent is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def parse_conversation(row: Any) -> list[Message]:
    """Validate a ``{"messages": [{"role", "content"}, ...]}`` row (as read from JSONL)."""
    if not isinstance(row, dict) or "messages" not in row:
        raise ValueError("row must be an object with a 'messages' list")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role is {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content must be a string")
        out.append(Message(m["role"], m["content"]))
    if not any(m.role == "assistant" for m in out):
        raise ValueError("a conversation needs at least one assistant message to learn from")
    return out


def render_ids(tokenizer, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    as_dicts = [{"role": m.role, "content": m.content} for m in messages]
    ids = tokenizer.apply_chat_template(as_dicts, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in transformers 5
        ids = ids["input_ids"]
    return list(ids)


def tokenize_conversation(tokenizer, messages: list[Message]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and a same-length mask, True on assistant tokens."""
    ids: list[int] = []
    mask: list[bool] = []
    for i, m in enumerate(messages):
        if m.role != "assistant":
            continue
        prompt = render_ids(tokenizer, messages[:i], add_generation_prompt=True)
        full = render_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(prompt)] != prompt or prompt[: len(ids)] != ids:
            raise ValueError("the chat template does not render conversations prefix-consistently; "
                             "cannot locate the assistant tokens")
        mask += [False] * (len(prompt) - len(ids)) + [True] * (len(full) - len(prompt))
        ids = full
    return ids, mask


def prompt_ids(tokenizer, messages: list[Message]) -> list[int]:
    """Tokens of a conversation up to and including the assistant generation prompt."""
    return render_ids(tokenizer, messages, add_generation_prompt=True)


def parse_sft_row(row: Any) -> list[Message] | str:
    """A supervised row: ``{"messages": [...]}`` (loss on assistant turns) or ``{"text": "..."}`` (plain
    pretraining text, loss on every token)."""
    if isinstance(row, dict) and "text" in row and "messages" not in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise ValueError("'text' must be a non-empty string")
        return row["text"]
    return parse_conversation(row)


def tokenize_sft_row(tokenizer, row: list[Message] | str) -> tuple[list[int], list[bool]]:
    """Tokens and learn-mask of a parsed supervised row. Plain text gets the tokenizer's own special
    tokens (e.g. BOS) and ends with EOS; every token is learned."""
    if isinstance(row, str):
        ids = list(tokenizer(row)["input_ids"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        return ids, [True] * len(ids)
    return tokenize_conversation(tokenizer, row)


def row_texts(row: list[Message] | str) -> list[str]:
    """The raw texts of a row (one per message), for fitting a scratch tokenizer."""
    return [row] if isinstance(row, str) else [f"{m.role}\n{m.content}" for m in row]


def pad_id(tokenizer) -> int:
    """The tokenizer's padding id, or its EOS when it has none (padding is never attended or learned)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
