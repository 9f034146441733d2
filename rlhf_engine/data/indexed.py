"""Megatron indexed datasets (``<prefix>.bin`` + ``<prefix>.idx``) for corpora too large for JSONL.

    rlhf-engine data preprocess --input corpus.jsonl --output-prefix data/corpus --tokenizer runs/sft/hf
    data.pretrain_path=data/corpus        # PPO-ptx (or data.train_path for SFT) reads it

Writing and reading go through megatron-core's ``IndexedDatasetBuilder`` / ``IndexedDataset`` (memory
mapped), so the files are the ones Megatron-LM and NeMo produce and read. A document is one JSONL row:
``{"text": ...}`` is tokenized as it is (EOS appended), a chat row is rendered with the chat template.
For training, documents are concatenated and cut into fixed-length samples by the C++ sample index
(``packer.sample_index``): every token is a target, as in pretraining.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .chat import parse_sft_row, tokenize_sft_row
from .packer import sample_index
from .packing import IGNORE_INDEX, Example
from .reader import read_rows


def is_indexed(path: str | os.PathLike) -> bool:
    """``path`` names an indexed dataset: a prefix with ``.bin`` and ``.idx``, or one of those files."""
    prefix = _prefix(path)
    return Path(f"{prefix}.bin").exists() and Path(f"{prefix}.idx").exists()


def _prefix(path: str | os.PathLike) -> str:
    p = str(path)
    return p[:-4] if p.endswith((".bin", ".idx")) else p


def write_indexed(documents: Iterable[list[int]], prefix: str | os.PathLike, vocab_size: int) -> int:
    """Write token documents; returns how many. Token ids are stored as uint16 when they fit, else int32."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # lazy: megatron-core is slow to import

    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab_size <= 65535 else np.int32
    builder = IndexedDatasetBuilder(f"{prefix}.bin.tmp", dtype=dtype)
    n = 0
    for doc in documents:
        builder.add_item(torch.tensor(doc, dtype=torch.int64))
        builder.end_document()
        n += 1
    builder.finalize(f"{prefix}.idx.tmp")
    os.replace(f"{prefix}.bin.tmp", f"{prefix}.bin")  # the pair appears complete or not at all
    os.replace(f"{prefix}.idx.tmp", f"{prefix}.idx")
    return n


def read_documents(path: str | os.PathLike) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset  # lazy: megatron-core is slow to import

    ds = IndexedDataset(_prefix(path))
    return [np.array(ds[i], dtype=np.int64) for i in range(len(ds))]  # copies: the views die with the mmap


def preprocess(input_path: str | os.PathLike, prefix: str | os.PathLike, tokenizer) -> int:
    """JSONL/Parquet rows (``{"text"}`` or chat) -> an indexed dataset of token documents."""
    rows = read_rows(input_path, parse_sft_row)
    eos = tokenizer.eos_token_id

    def docs():
        for row in rows:
            ids, _ = tokenize_sft_row(tokenizer, row)
            if isinstance(row, str) and eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            yield ids

    return write_indexed(docs(), prefix, len(tokenizer))


def indexed_examples(path: str | os.PathLike, seq_len: int, seed: int, epochs: int = 1) -> list[Example]:
    """Fixed-length next-token samples of ``seq_len`` tokens over the concatenated documents, in the
    shuffled order of the C++ sample index (every token a target)."""
    docs = read_documents(path)
    order, starts, shuffle = sample_index([len(d) for d in docs], seq_len - 1, epochs, seed)
    out = []
    for s in shuffle.tolist():
        (pos, off), (end_pos, end_off) = starts[s], starts[s + 1]
        parts, p, o = [], int(pos), int(off)
        while p < int(end_pos) or (p == int(end_pos) and o <= int(end_off)):
            doc = docs[int(order[p])]
            stop = int(end_off) + 1 if p == int(end_pos) else len(doc)
            parts.append(doc[o:stop])
            if p == int(end_pos):
                break
            p, o = p + 1, 0
        ids = np.concatenate(parts).astype(np.int64).tolist()[:seq_len]
        out.append(Example(ids, ids[1:] + [IGNORE_INDEX]))
    return out
