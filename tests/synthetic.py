"""Synthetic comparison data with a hidden scorer, for reward-model and DPO tests (no downloads)."""

import json
import random

WORDS = "apple stone river cloud tiger lemon piano rocket garden silver".split()


def hidden_score(text: str) -> float:
    """What the simulated labelers prefer: more 'apple', fewer 'stone'."""
    words = text.split()
    return words.count("apple") - words.count("stone")


def _prompt(rng):
    return [{"role": "user", "content": f"Say something about the {rng.choice(WORDS)}."}]


def _response(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))


def rankings(n: int, seed: int = 0, noise: float = 0.3) -> list[dict]:
    """``n`` rows of K = 4..6 responses ranked by the hidden score plus Gaussian noise (ties when equal
    after rounding)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        responses = [_response(rng) for _ in range(rng.randint(4, 6))]
        noisy = [round(hidden_score(r) + rng.gauss(0, noise)) for r in responses]
        order = sorted(set(noisy), reverse=True)
        ranks = [order.index(v) + 1 for v in noisy]
        if len(set(ranks)) > 1:
            rows.append({"prompt": _prompt(rng), "responses": responses, "ranking": ranks})
    return rows


def choices(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        responses = [_response(rng) for _ in range(3)]
        best = max(range(3), key=lambda i: hidden_score(responses[i]) + rng.gauss(0, 0.3))
        rows.append({"prompt": _prompt(rng), "responses": responses, "chosen": best})
    return rows


def rule_rows(n: int, seed: int = 0) -> list[dict]:
    """Rule 'no_stone' is violated when the answer mentions stone; 'short' when it has > 5 words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        answer = _response(rng)
        labels = {"no_stone": "stone" in answer.split(), "short": len(answer.split()) > 5}
        if rng.random() < 0.1:
            labels["short"] = "unsure"
        rows.append({"messages": _prompt(rng) + [{"role": "assistant", "content": answer}], "labels": labels})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
