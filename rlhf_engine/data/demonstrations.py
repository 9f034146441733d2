"""SFT data: chat demonstrations and plain text as next-token examples, and their micro-batch order.

Used by SFT and by PPO-ptx's pretraining mix. ``sft_stream`` packs rows into ``data.seq_len`` tokens
(or, with ``trainer.token_budget``, into token-budget micro-batches balanced across data-parallel ranks).
"""

from __future__ import annotations

import random

from ..config import ConfigError, RunConfig
from .builtin import demo_conversations
from .chat import parse_conversation, parse_sft_row, tokenize_sft_row
from .indexed import indexed_examples, is_indexed
from .packer import balance, pack_ffd
from .packing import Example, PackedBatch, collate, next_token_example, pack
from .reader import read_rows
from .streams import BatchStream, load_split, shuffled


def load_sft_rows(cfg: RunConfig) -> tuple[list, list]:
    """(train, eval) rows from JSONL/Parquet files or the built-in set; eval held out by a seeded split."""
    return load_split(cfg, parse_sft_row, lambda: [parse_conversation(r) for r in
                                                    demo_conversations(cfg.data.builtin_rows, seed=cfg.trainer.seed)])


def to_examples(tokenizer, rows: list, seq_len: int) -> list[Example]:
    return [next_token_example(*tokenize_sft_row(tokenizer, row), seq_len) for row in rows]


def pretraining_examples(path: str, tokenizer, cfg: RunConfig) -> list[Example]:
    """PPO-ptx rows: a Megatron indexed corpus (fixed-length samples from the C++ sample index), or
    plain-text / chat rows tokenized like SFT's."""
    if is_indexed(path):
        return indexed_examples(path, cfg.data.seq_len, cfg.trainer.seed)
    return to_examples(tokenizer, read_rows(path, parse_sft_row), cfg.data.seq_len)


def sft_stream(examples: list[Example], cfg: RunConfig, pad: int, micro_batch_size: int | None = None,
               dp: int = 1) -> BatchStream:
    """Each epoch reshuffles (seeded by the epoch), then either
    - packs first-fit into rows of ``data.seq_len`` and cuts the rows into micro-batches of
      ``micro_batch_size`` rows (default ``trainer.micro_batch_size``; a partial last one is dropped), or
    - with ``trainer.token_budget``: packs the examples into micro-batches of at most that many tokens
      (one row each; C++ first-fit decreasing) and deals every optimizer step's micro-batches to the
      ``dp`` ranks with balanced token loads (C++ balanced differencing). Rank r takes the step's
      micro-batches r, r + dp, ... (``GlobalSteps``), so the plan is laid out in that order."""
    seq_len, mbs = cfg.data.seq_len, micro_batch_size or cfg.trainer.micro_batch_size
    budget = cfg.trainer.token_budget
    if budget is not None and budget < seq_len:
        raise ConfigError(f"trainer.token_budget={budget} is below data.seq_len={seq_len}: an example of "
                          "seq_len tokens would not fit a micro-batch")

    def plan_epoch(epoch: int) -> list[list[list[int]]]:
        order = shuffled(len(examples), cfg.trainer.seed, epoch)
        if budget is None:
            rows = [[order[i] for i in row] for row in pack([examples[i] for i in order], seq_len)]
            return [rows[i : i + mbs] for i in range(0, len(rows) - mbs + 1, mbs)]
        lengths = [len(examples[i].input_ids) for i in order]
        bins = [[order[i] for i in b] for b in pack_ffd(lengths, budget)]
        random.Random(cfg.trainer.seed * 31 + epoch).shuffle(bins)  # FFD emits the longest first
        per_step = cfg.trainer.grad_accum_steps * dp
        plans = []
        for s in range(0, len(bins) - per_step + 1, per_step):
            step = bins[s : s + per_step]
            ranks = balance([sum(len(examples[i].input_ids) for i in b) for b in step], dp)
            plans += [[step[ranks[r][j]]] for j in range(per_step // dp) for r in range(dp)]
        return plans

    row_len = budget if budget is not None else seq_len
    return BatchStream(plan_epoch, lambda rows: collate(examples, rows, row_len, pad))


def eval_batches(examples: list[Example], cfg: RunConfig, pad: int) -> list[PackedBatch]:
    rows = pack(examples, cfg.data.seq_len)
    mbs = cfg.trainer.micro_batch_size
    return [collate(examples, rows[i : i + mbs], cfg.data.seq_len, pad)
            for i in range(0, len(rows), mbs)][: cfg.trainer.eval_batches]
