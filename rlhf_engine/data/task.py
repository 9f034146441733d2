"""The quickstart's built-in task: describe an object, judged by a hidden gold scorer (no downloads).

    prompt     "Describe the lemon."                               (a chat user turn)
    response   "The lemon is bright and calm."

The gold scorer (``gold_score``) stands in for what people want and is never shown to the model or the
reward model; they learn it only through rankings by simulated labelers (gold score plus Gaussian
noise, so two labelers disagree on some pairs, as InstructGPT's did on about 27%):

    gold = 1.0 [the prompt's object is named]
         + 1.0 per distinct pleasant adjective (at most 2)
         - 1.0 per unpleasant adjective
         - 0.5 per repeated content word
         - 0.25 per word beyond 12

Everything is generated deterministically from a seed: a plain-text pretraining corpus over the same
vocabulary, chat demonstrations of mixed quality (adjectives drawn uniformly, sometimes off-topic), and
prompts. A policy that names the object, picks pleasant adjectives and stays short scores about 3;
the demonstrations average near 0.6. Repeating pleasant words fools a reward model that never saw
repetition but not the gold scorer: that gap is over-optimisation.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

from .preference import scores_to_ranking

OBJECTS = ("lemon river stone cloud tiger piano rocket garden window candle forest planet mirror pencil "
           "dragon bridge castle island market basket anchor meadow coffee butter").split()
PLEASANT = "bright warm kind calm gentle happy lovely fresh".split()
UNPLEASANT = "dark cold sad dull broken angry noisy stale".split()
NEUTRAL = "big small old new round tall quiet plain".split()
ADJECTIVES = PLEASANT + UNPLEASANT + NEUTRAL
FUNCTION_WORDS = {"the", "is", "and", "it", "a", "very", "also"}
_PROMPT = re.compile(r"Describe the (\w+)\.")


def prompt_text(obj: str) -> str:
    return f"Describe the {obj}."


def gold_score(prompt: str, response: str) -> float:
    """The hidden gold reward of ``response`` to ``prompt`` (module docstring)."""
    m = _PROMPT.search(prompt)
    obj = m.group(1) if m else None
    words = re.findall(r"[a-z]+", response.lower())
    content = [w for w in words if w not in FUNCTION_WORDS]
    score = 1.0 if obj is not None and obj in words else 0.0
    score += min(2, len({w for w in words if w in PLEASANT}))
    score -= sum(w in UNPLEASANT for w in words)
    score -= 0.5 * (len(content) - len(set(content)))
    score -= 0.25 * max(0, len(words) - 12)
    return score


def demonstration(rng: random.Random, obj: str) -> str:
    """A response of mixed quality: random adjectives, sometimes the wrong object or a second sentence."""
    named = obj if rng.random() < 0.8 else rng.choice(OBJECTS)
    a, b = rng.sample(ADJECTIVES, 2)
    text = f"The {named} is {a} and {b}."
    if rng.random() < 0.3:
        text += f" It is {rng.choice(ADJECTIVES)}."
    return text


def corpus_sentence(rng: random.Random) -> str:
    obj, adj = rng.choice(OBJECTS), rng.choice(ADJECTIVES)
    forms = (f"The {obj} is {adj}.", f"A {adj} {obj} is near the {rng.choice(OBJECTS)}.",
             f"It is a {adj} and {rng.choice(ADJECTIVES)} {obj}.", f"The {obj} and the {rng.choice(OBJECTS)} are {adj}.")
    return rng.choice(forms)


@dataclass(frozen=True)
class Task:
    pretrain: list[dict]  # {"text": ...}
    demonstrations: list[dict]  # {"messages": [user, assistant]}
    prompts: list[dict]  # {"prompt": [user]} for rankings and RL
    eval_prompts: list[dict]  # held out from everything above


def build_task(seed: int, *, pretrain_rows: int = 3000, demonstrations: int = 2000, prompts: int = 600,
               eval_prompts: int = 64) -> Task:
    rng = random.Random(seed)
    pretrain = [{"text": " ".join(corpus_sentence(rng) for _ in range(rng.randint(2, 5)))} for _ in range(pretrain_rows)]
    demos = []
    for _ in range(demonstrations):
        obj = rng.choice(OBJECTS)
        demos.append({"messages": [{"role": "user", "content": prompt_text(obj)},
                                   {"role": "assistant", "content": demonstration(rng, obj)}]})
    make = lambda n: [{"prompt": [{"role": "user", "content": prompt_text(rng.choice(OBJECTS))}]} for _ in range(n)]  # noqa: E731
    return Task(pretrain, demos, make(prompts), make(eval_prompts))


def label(scores: Sequence[float], noise: float, rng: random.Random) -> list[int]:
    """A simulated labeler's ranking (1 = best) of responses with these gold scores."""
    return scores_to_ranking([s + rng.gauss(0.0, noise) for s in scores])


def pair_agreement(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """(agreeing, compared) over the pairs both rankings order (ties in either are skipped)."""
    agree = total = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            if a[i] != a[j] and b[i] != b[j]:
                total += 1
                agree += (a[i] < a[j]) == (b[i] < b[j])
    return agree, total
