"""Packing variable-length examples into fixed-length rows (several documents per row).

Each example is (token ids, next-token labels with -100 where no loss is taken). A packed row keeps
its documents apart through ``document_ids``: the model attends only within a document and restarts
positions for each, so packing changes throughput, not the math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
PAD_DOCUMENT = -1


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # labels[t] is the target for position t (the next token) or IGNORE_INDEX


@dataclass(frozen=True)
class PackedBatch:
    """A micro-batch of packed rows."""

    input_ids: torch.Tensor  # (B, S) long
    labels: torch.Tensor  # (B, S) long, IGNORE_INDEX where no loss is taken
    document_ids: torch.Tensor  # (B, S) long, PAD_DOCUMENT on padding

    def counts(self) -> dict[str, int]:
        """``tokens``: real tokens (throughput); ``targets``: label tokens, what the SFT loss averages over."""
        return {"tokens": int((self.document_ids != PAD_DOCUMENT).sum()),
                "targets": int((self.labels != IGNORE_INDEX).sum())}

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.labels.to(device), self.document_ids.to(device))


def next_token_example(ids: list[int], learn: list[bool], max_len: int) -> Example:
    """Truncate to ``max_len``; the label at t is ids[t+1] where ``learn[t+1]``, else ignored."""
    ids, learn = ids[:max_len], learn[:max_len]
    labels = [ids[t + 1] if learn[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return Example(ids, labels)


def pack(examples: list[Example], seq_len: int) -> list[list[int]]:
    """Greedy first-fit, in order: indices of the examples in each row (no example is split).

    Examples longer than ``seq_len`` are refused; truncate them first.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens > seq_len={seq_len}; truncate first")
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
    return rows


def collate(examples: list[Example], rows: list[list[int]], seq_len: int, pad_id: int) -> PackedBatch:
    """Materialize packed rows as tensors, padding each to ``seq_len``."""
    B = len(rows)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
    document_ids = torch.full((B, seq_len), PAD_DOCUMENT, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for doc, i in enumerate(row):
            ex = examples[i]
            n = len(ex.input_ids)
            input_ids[b, t : t + n] = torch.tensor(ex.input_ids)
            labels[b, t : t + n] = torch.tensor(ex.labels)
            document_ids[b, t : t + n] = doc
            t += n
    return PackedBatch(input_ids, labels, document_ids)
