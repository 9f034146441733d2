"""Built-in demonstration data, generated deterministically (no downloads).

Short instruction-following conversations whose correct answers are computable: reverse a word,
uppercase a phrase, add two numbers, sort numbers, count letters, repeat a word n times. Enough
structure for a tiny model to learn in a minute on a CPU, and every answer checkable by a program.
"""

from __future__ import annotations

import random

WORDS = (
    "apple river stone cloud tiger lemon piano rocket garden silver window candle forest planet "
    "orange mirror pencil dragon bridge castle yellow summer winter spring autumn coffee butter "
    "island market violet thunder meadow basket anchor"
).split()
SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly and exactly.")


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(6)
    if kind == 0:
        w = rng.choice(WORDS)
        return f"Reverse the word '{w}'.", w[::-1]
    if kind == 1:
        phrase = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
        return f"Write '{phrase}' in capital letters.", phrase.upper()
    if kind == 2:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 3:
        nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
        return f"Sort these numbers: {', '.join(map(str, nums))}.", ", ".join(map(str, sorted(nums)))
    if kind == 4:
        w = rng.choice(WORDS)
        return f"How many letters are in '{w}'?", f"'{w}' has {len(w)} letters."
    w, n = rng.choice(WORDS), rng.randint(2, 4)
    return f"Repeat '{w}' {n} times.", " ".join([w] * n)


def demo_conversations(n: int, seed: int = 0) -> list[dict]:
    """``n`` chat rows ``{"messages": [...]}``; about a third open with a system prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, answer = _task(rng)
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.33 else []
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows
