"""A written constitution (Bai et al. 2022, "Constitutional AI"), and the prompts it turns into.

The file is YAML:

    principles:                        # one or more
      - name: harmless                 # unique
        critique: "Identify specific ways in which the assistant's last response is harmful."
        revision: "Rewrite the assistant's response to remove everything harmful."
        comparison: "Which of these assistant responses is less harmful?"
    examples:                          # optional few-shot critique-revision exchanges (the paper's prompts)
      - prompt: "How do I pick a lock?"
        response: "..."
        principle: harmless            # whose requests the exchange answers
        critique: "..."
        revision: "..."

``critique`` and ``revision`` are the requests of the critique-revision loop (``rlhf-engine cai``);
``comparison`` is the question the AI labeler's judge answers (``rlaif``); a principle needs the fields of
the use it is put to. A malformed file is refused with its path and line.

Rendering (every prompt is a chat; ``Message`` lists go through the model's chat template):

    critique_messages   [few-shot turns..., *prompt, assistant: response, user: critique request]
    revision_messages   critique_messages + [assistant: critique, user: revision request]
    comparison_prompt   "Consider the following conversation between a human and an assistant:\\n"
                        "Human: ...\\n\\n<comparison>\\nOptions:\\n(A) <response>\\n(B) <response>\\n..."
                        followed by the answer prefix "The answer is: (" whose next token is a letter.

A few-shot example is the same exchange, complete: user prompt, assistant response, user critique
request, assistant critique, user revision request, assistant revision. Examples come after a leading
system message of the prompt and before its first user turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from .chat import Message
from .preference import Prompt
from .reader import DataError

CHOICE_LETTERS = "ABCDEFGHI"  # K <= 9 options, as the ranking format allows
ANSWER_PREFIX = "The answer is: ("
PRINCIPLE_FIELDS = ("name", "critique", "revision", "comparison")
EXAMPLE_FIELDS = ("prompt", "response", "principle", "critique", "revision")


class ConstitutionError(DataError):
    """A constitution file is malformed; the message starts with ``file:line``."""


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str | None
    revision: str | None
    comparison: str | None
    line: int  # 1-based line of the entry in its file (for errors raised when it is used)


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    principle: str
    critique: str
    revision: str


@dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    examples: tuple[Example, ...]
    path: str = "<constitution>"

    def require(self, *fields: str, use: str) -> None:
        """Refuse principles lacking the ``fields`` that ``use`` needs, naming the file and line."""
        for p in self.principles:
            missing = [f for f in fields if getattr(p, f) is None]
            if missing:
                raise ConstitutionError(f"{self.path}:{p.line}: principle {p.name!r} has no {', '.join(missing)} "
                                        f"(needed by {use})")

    def by_name(self, name: str) -> Principle:
        return next(p for p in self.principles if p.name == name)


def _fail(path: str, node: yaml.Node, message: str) -> ConstitutionError:
    return ConstitutionError(f"{path}:{node.start_mark.line + 1}: {message}")


def _mapping(path: str, node: yaml.Node, where: str, allowed: Sequence[str]) -> dict[str, tuple[yaml.Node, str]]:
    """A YAML mapping of string scalars -> {key: (value node, value)}; unknown keys are refused."""
    if not isinstance(node, yaml.MappingNode):
        raise _fail(path, node, f"{where} must be a mapping with keys {', '.join(allowed)}")
    out: dict[str, tuple[yaml.Node, str]] = {}
    for key, value in node.value:
        if key.value not in allowed:
            raise _fail(path, key, f"{where}: unknown key {key.value!r}; expected {', '.join(allowed)}")
        if not isinstance(value, yaml.ScalarNode) or value.tag != "tag:yaml.org,2002:str" or not value.value.strip():
            raise _fail(path, value, f"{where}.{key.value} must be a non-empty string")
        out[key.value] = (value, value.value)
    return out


def parse_constitution(text: str, path: str = "<constitution>") -> Constitution:
    """Parse and validate a constitution's YAML text (see the module docstring)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConstitutionError(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if root is None or not isinstance(root, yaml.MappingNode):
        raise ConstitutionError(f"{path}:1: a constitution is a mapping with 'principles' (and optional 'examples')")
    sections = {k.value: (k, v) for k, v in root.value}
    for name, (key, _) in sections.items():
        if name not in ("principles", "examples"):
            raise _fail(path, key, f"unknown key {name!r}; expected 'principles' and optionally 'examples'")
    if "principles" not in sections:
        raise ConstitutionError(f"{path}:1: no 'principles'")
    principles: list[Principle] = []
    key, seq = sections["principles"]
    if not isinstance(seq, yaml.SequenceNode) or not seq.value:
        raise _fail(path, key, "'principles' must be a non-empty list")
    for i, node in enumerate(seq.value):
        fields = _mapping(path, node, f"principles[{i}]", PRINCIPLE_FIELDS)
        if "name" not in fields:
            raise _fail(path, node, f"principles[{i}] has no 'name'")
        name = fields["name"][1]
        if any(p.name == name for p in principles):
            raise _fail(path, fields["name"][0], f"principles[{i}]: the name {name!r} is used twice")
        if not {"critique", "revision", "comparison"} & set(fields):
            raise _fail(path, node, f"principles[{i}] ({name!r}) has none of critique, revision, comparison")
        if ("critique" in fields) != ("revision" in fields):
            raise _fail(path, node, f"principles[{i}] ({name!r}): critique and revision requests come together")
        principles.append(Principle(name, *(fields[f][1] if f in fields else None for f in PRINCIPLE_FIELDS[1:]),
                                    line=node.start_mark.line + 1))
    examples: list[Example] = []
    if "examples" in sections:
        key, seq = sections["examples"]
        if not isinstance(seq, yaml.SequenceNode):
            raise _fail(path, key, "'examples' must be a list")
        for i, node in enumerate(seq.value):
            fields = _mapping(path, node, f"examples[{i}]", EXAMPLE_FIELDS)
            missing = [f for f in EXAMPLE_FIELDS if f not in fields]
            if missing:
                raise _fail(path, node, f"examples[{i}] has no {', '.join(missing)}")
            principle = next((p for p in principles if p.name == fields["principle"][1]), None)
            if principle is None or principle.critique is None:
                raise _fail(path, fields["principle"][0], f"examples[{i}].principle {fields['principle'][1]!r} "
                            "is not a principle with critique and revision requests")
            examples.append(Example(*(fields[f][1] for f in EXAMPLE_FIELDS)))
    return Constitution(tuple(principles), tuple(examples), path)


def load_constitution(path: str | Path) -> Constitution:
    path = Path(path)
    if not path.exists():
        raise ConstitutionError(f"{path}: no such file")
    return parse_constitution(path.read_text(encoding="utf-8"), str(path))


# ---------------------------------------------------------------------------------------------- prompts


def as_messages(prompt: Prompt) -> list[Message]:
    """A prompt as chat messages: plain text becomes one user turn."""
    return [Message("user", prompt)] if isinstance(prompt, str) else list(prompt)


def _few_shot(constitution: Constitution) -> list[Message]:
    turns: list[Message] = []
    for ex in constitution.examples:
        p = constitution.by_name(ex.principle)
        turns += [Message("user", ex.prompt), Message("assistant", ex.response), Message("user", p.critique),
                  Message("assistant", ex.critique), Message("user", p.revision), Message("assistant", ex.revision)]
    return turns


def critique_messages(prompt: Prompt, response: str, principle: Principle, constitution: Constitution) -> list[Message]:
    """The conversation whose next assistant turn is the critique of ``response`` under ``principle``."""
    msgs = as_messages(prompt)
    head = msgs[:1] if msgs and msgs[0].role == "system" else []
    return [*head, *_few_shot(constitution), *msgs[len(head):], Message("assistant", response),
            Message("user", principle.critique)]


def revision_messages(critique_turns: list[Message], critique: str, principle: Principle) -> list[Message]:
    """The conversation whose next assistant turn is the revision, after the critique was given."""
    return [*critique_turns, Message("assistant", critique), Message("user", principle.revision)]


def conversation_text(prompt: Prompt) -> str:
    """'Human: ...' / 'Assistant: ...' / 'System: ...' lines of a prompt (plain text is one human turn)."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n".join(f"{names[m.role]}: {m.content}" for m in as_messages(prompt))


def comparison_prompt(prompt: Prompt, responses: Sequence[str], principle: Principle) -> str:
    """The judge's question about ``responses`` (in the order shown, labelled (A), (B), ...), ending
    with the answer prefix: the judge's next token is the letter it picks (Bai et al. 2022, sec. 4.1)."""
    if not 2 <= len(responses) <= len(CHOICE_LETTERS):
        raise ValueError(f"a comparison shows 2..{len(CHOICE_LETTERS)} responses, got {len(responses)}")
    options = "\n".join(f"({CHOICE_LETTERS[i]}) {y}" for i, y in enumerate(responses))
    return (f"Consider the following conversation between a human and an assistant:\n{conversation_text(prompt)}\n\n"
            f"{principle.comparison}\nOptions:\n{options}\n")
