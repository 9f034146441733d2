"""Supervised fine-tuning on chat demonstrations (InstructGPT step 1), loss on assistant tokens only.

    rlhf-engine sft --config configs/sft_tiny.yaml [key=value ...]
    scripts/torchrun.sh 4 sft --config configs/sft_tiny.yaml parallel.tp=2 parallel.dp_shard=2

Reads ``{"messages": [...]}`` rows (loss on assistant turns) and ``{"text": ...}`` rows (plain
pretraining text, loss on every token) from JSONL or Parquet, or the built-in demo set; renders each
conversation with the tokenizer's chat template, packs rows into ``data.seq_len`` tokens, trains with the
shared ``Trainer`` (checkpoints every ``trainer.save_every`` steps; a rerun resumes), evaluates on
held-out rows, prints sample responses, and exports the model with its tokenizer as a Hugging Face
checkpoint under ``<out_dir>/hf``. Under torchrun the model is tensor-parallel and/or
FSDP-sharded as ``parallel.*`` says, each data-parallel rank trains on its share of the micro-batches,
and rank 0 writes the run directory.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from ..algorithms.sft import sft_loss
from ..config import ConfigError, RunConfig
from ..data.builtin import demo_conversations
from ..data.chat import Message, parse_conversation, parse_sft_row, prompt_ids, row_texts, tokenize_sft_row
from ..data.packing import Example, PackedBatch, collate, next_token_example, pack
from ..data.indexed import indexed_examples, is_indexed
from ..data.packer import balance, pack_ffd
from ..data.reader import DataError
from ..parallel.checkpoint import export_hf
from ..parallel.runtime import init_runtime
from ..rollout import generate
from ..trainer import BatchStream, Trainer
from .common import announce, base_model, build_tokenizer, load_split, open_run, pad_id, shuffled, split_rows, write_summary

def load_sft_rows(cfg: RunConfig) -> tuple[list, list]:
    """(train, eval) rows from JSONL/Parquet files or the built-in set; eval held out by a seeded split."""
    return load_split(cfg, parse_sft_row, lambda: [parse_conversation(r) for r in
                                                    demo_conversations(cfg.data.builtin_rows, seed=cfg.trainer.seed)])


def to_examples(tokenizer, rows: list, seq_len: int) -> list[Example]:
    return [next_token_example(*tokenize_sft_row(tokenizer, row), seq_len) for row in rows]


def sft_stream(examples: list[Example], cfg: RunConfig, pad: int, micro_batch_size: int | None = None,
               dp: int = 1) -> BatchStream:
    """Each epoch reshuffles (seeded by the epoch), then either
    - packs first-fit into rows of ``data.seq_len`` and cuts the rows into micro-batches of
      ``micro_batch_size`` rows (default ``trainer.micro_batch_size``; a partial last one is dropped), or
    - with ``trainer.token_budget``: packs the examples into micro-batches of at most that many tokens
      (one row each; C++ first-fit decreasing) and deals every optimizer step's micro-batches to the
      ``dp`` ranks with balanced token loads (C++ balanced differencing). The trainer gives rank r the
      step's micro-batches r, r + dp, ..., so the plan is laid out in that order."""
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


def run_sft(cfg: RunConfig) -> dict[str, Any]:
    """Train, evaluate and export; returns the summary also written to ``<out_dir>/summary.json``."""
    start = time.perf_counter()
    rt = init_runtime(cfg)
    out = open_run(cfg, rt)
    d = cfg.data
    if d.train_path is not None and is_indexed(d.train_path):  # a Megatron corpus: fixed-length samples
        if cfg.model.tokenizer_path is None and cfg.model.hf_path is None:
            raise DataError(f"{d.train_path} is an indexed dataset: set model.tokenizer_path (or model.hf_path) "
                            "to the tokenizer it was preprocessed with")
        tokenizer = build_tokenizer(cfg, (), rt, out)
        train_ex, eval_ex = split_rows(indexed_examples(d.train_path, d.seq_len, cfg.trainer.seed), d.eval_fraction,
                                       cfg.trainer.seed)
        eval_rows = []
    else:
        train_rows, eval_rows = load_sft_rows(cfg)
        tokenizer = build_tokenizer(cfg, (t for row in train_rows for t in row_texts(row)), rt, out)
        train_ex = to_examples(tokenizer, train_rows, d.seq_len)
        eval_ex = to_examples(tokenizer, eval_rows, d.seq_len)
    model = rt.parallelize(base_model(cfg, tokenizer), cfg)
    pad = pad_id(tokenizer)
    announce(rt, "sft", model, f"{len(train_ex)} train / {len(eval_ex)} eval rows, vocab {len(tokenizer)}")

    trainer = Trainer(cfg, rt, model, sft_loss, sft_stream(train_ex, cfg, pad, dp=rt.dims.dp), name="sft",
                      eval_batches=eval_batches(eval_ex, cfg, pad))
    result = trainer.fit()
    summary = {"steps": result["step"], "finished": result["finished"], "resumed": result["resumed"],
               "world_size": rt.world_size, "train_tokens": result["tokens"],
               "eval_loss_initial": result["first_eval"].get("eval_loss"),
               "eval_loss_final": result["final_eval"].get("eval_loss"),
               "eval_accuracy_final": result["final_eval"].get("eval_accuracy")}
    if result["finished"]:
        export_hf(model, out / "hf", tokenizer=tokenizer)
        summary["export"] = str(out / "hf")
        # Sampling from a sharded model needs the tensor-parallel generator; load the export instead.
        chats = [r for r in eval_rows if not isinstance(r, str)][:4]
        summary["samples"] = sample_responses(model, tokenizer, chats, cfg) if rt.mesh is None else []
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    write_summary(rt, out, summary)
    return summary


def sample_responses(model, tokenizer, conversations: list[list[Message]], cfg: RunConfig) -> list[dict[str, str]]:
    """Responses to the prompts of held-out conversations, sampled with the rollout settings."""
    if not conversations:
        return []
    prompts = []
    for conv in conversations:
        first_answer = next(i for i, msg in enumerate(conv) if msg.role == "assistant")
        prompts.append(conv[:first_answer])
    model.eval()
    r = cfg.rollout
    gen = generate(
        model,
        [prompt_ids(tokenizer, p) for p in prompts],
        max_new_tokens=r.max_new_tokens,
        stop_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        temperature=r.temperature,
        top_k=r.top_k,
        top_p=r.top_p,
        generator=torch.Generator().manual_seed(cfg.trainer.seed),
    )
    return [
        {"prompt": p[-1].content, "response": tokenizer.decode(o, skip_special_tokens=True).strip(),
         "reference": conv[len(p)].content}
        for p, o, conv in zip(prompts, gen.responses, conversations)
    ]
