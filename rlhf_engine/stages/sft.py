"""Supervised fine-tuning on chat demonstrations (InstructGPT step 1), loss on assistant tokens only.

    rlhf-engine sft --config configs/sft_tiny.yaml [key=value ...]

Reads ``{"messages": [...]}`` JSONL (or the built-in demo set), renders each conversation with the
tokenizer's chat template, packs conversations into rows of ``data.seq_len`` tokens, trains, evaluates
on held-out conversations, prints sample responses, and exports the model with its tokenizer as a
Hugging Face checkpoint under ``<out_dir>/hf``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from ..algorithms.sft import sft_loss
from ..config import RunConfig, to_yaml
from ..data.builtin import demo_conversations
from ..data.chat import Message, parse_conversation, prompt_ids, tokenize_conversation
from ..data.jsonl import DataError, read_jsonl
from ..data.packing import Example, PackedBatch, collate, next_token_example, pack
from ..data.tokenizer import train_bpe_tokenizer
from ..models import Transformer, load_hf_model, load_tokenizer, save_hf_model
from ..rollout import generate
from ..trainer import MetricsWriter, build_optimizer, build_scheduler, train_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_single_process(cfg: RunConfig) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.parallel.world_size != 1 or world != 1:
        raise NotImplementedError(
            f"this stage runs on one process; got parallel world size {cfg.parallel.world_size} and "
            f"WORLD_SIZE={world}. Tensor/pipeline/FSDP layouts are not wired into the stages yet."
        )


def load_conversations(cfg: RunConfig) -> tuple[list[list[Message]], list[list[Message]]]:
    """(train, eval) conversations from JSONL files or the built-in set; eval held out by a seeded split."""
    d = cfg.data
    if d.train_path is not None:
        train = list(read_jsonl(d.train_path, parse_conversation))
        if not train:
            raise DataError(f"{d.train_path}: no rows")
    else:
        train = [parse_conversation(r) for r in demo_conversations(d.builtin_rows, seed=cfg.trainer.seed)]
    if d.eval_path is not None:
        return train, list(read_jsonl(d.eval_path, parse_conversation))
    order = list(range(len(train)))
    random.Random(cfg.trainer.seed).shuffle(order)
    n_eval = max(1, int(len(train) * d.eval_fraction)) if d.eval_fraction > 0 else 0
    return [train[i] for i in order[n_eval:]], [train[i] for i in order[:n_eval]]


def build_model_and_tokenizer(cfg: RunConfig, corpus: list[list[Message]], device: torch.device):
    """The model (from an HF checkpoint or initialised from scratch) and its tokenizer."""
    m, dtype = cfg.model, DTYPES[cfg.precision.dtype]
    tok_path = m.tokenizer_path or m.hf_path
    if tok_path is not None:
        tokenizer = load_tokenizer(tok_path)
    else:
        texts = (f"{msg.role}\n{msg.content}" for conv in corpus for msg in conv)
        tokenizer = train_bpe_tokenizer(texts, vocab_size=m.architecture.vocab_size)
    if m.hf_path is not None:
        model = load_hf_model(m.hf_path, dtype=dtype, device=device)
    else:
        model = Transformer(m.architecture)
        model.reset_parameters(torch.Generator().manual_seed(cfg.trainer.seed))
        model = model.to(device=device, dtype=dtype)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}")
    return model, tokenizer


def to_examples(tokenizer, conversations: list[list[Message]], seq_len: int) -> list[Example]:
    out = []
    for conv in conversations:
        ids, mask = tokenize_conversation(tokenizer, conv)
        out.append(next_token_example(ids, mask, seq_len))
    return out


def micro_batches(examples: list[Example], cfg: RunConfig, pad_id: int) -> Iterator[PackedBatch]:
    """Endless stream: each epoch reshuffles (seeded by epoch), packs and cuts rows into micro-batches."""
    seq_len, mbs = cfg.data.seq_len, cfg.trainer.micro_batch_size
    epoch = 0
    while True:
        order = list(range(len(examples)))
        random.Random(cfg.trainer.seed * 1_000_003 + epoch).shuffle(order)
        shuffled = [examples[i] for i in order]
        rows = pack(shuffled, seq_len)
        for i in range(0, len(rows) - mbs + 1, mbs):
            yield collate(shuffled, rows[i : i + mbs], seq_len, pad_id)
        epoch += 1


@torch.no_grad()
def evaluate(model: Transformer, batches: list[PackedBatch], device: torch.device) -> dict[str, float]:
    """Token-mean NLL and next-token accuracy on assistant tokens of held-out conversations."""
    model.eval()
    nll = correct = targets = 0.0
    for b in batches:
        _, stats = sft_loss(model, b.to(device), 1)
        nll, correct, targets = nll + stats["nll_sum"], correct + stats["correct"], targets + stats["targets"]
    return {"eval_loss": nll / max(targets, 1), "eval_accuracy": correct / max(targets, 1)}


def run_sft(cfg: RunConfig) -> dict[str, Any]:
    """Train, evaluate and export; returns the summary also written to ``<out_dir>/summary.json``."""
    check_single_process(cfg)
    start = time.perf_counter()
    torch.manual_seed(cfg.trainer.seed)
    device = resolve_device(cfg.trainer.device)
    out = Path(cfg.trainer.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "metrics.jsonl").unlink(missing_ok=True)

    train_convs, eval_convs = load_conversations(cfg)
    model, tokenizer = build_model_and_tokenizer(cfg, train_convs, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_ex = to_examples(tokenizer, train_convs, cfg.data.seq_len)
    eval_ex = to_examples(tokenizer, eval_convs, cfg.data.seq_len)
    eval_rows = pack(eval_ex, cfg.data.seq_len)
    mbs = cfg.trainer.micro_batch_size
    eval_batches = [collate(eval_ex, eval_rows[i : i + mbs], cfg.data.seq_len, pad_id)
                    for i in range(0, len(eval_rows), mbs)][: cfg.trainer.eval_batches]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"sft: {n_params / 1e6:.2f}M parameters, {len(train_ex)} train / {len(eval_ex)} eval conversations, "
          f"vocab {len(tokenizer)}, device {device}", file=sys.stderr)

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)
    writer = MetricsWriter(out)
    stream = micro_batches(train_ex, cfg, pad_id)
    first_eval = evaluate(model, eval_batches, device)
    writer.write({"step": 0, **first_eval})
    progress = _progress(cfg)
    tokens = 0
    for step in range(1, cfg.trainer.max_steps + 1):
        batch = [next(stream).to(device) for _ in range(cfg.trainer.grad_accum_steps)]
        t0 = time.perf_counter()
        m = train_step(model, optimizer, scheduler, batch, sft_loss, cfg.optim.grad_clip)
        tokens += sum(b.input_ids.numel() for b in batch)
        m["accuracy"] = m.pop("correct") / max(m["targets"], 1)
        m["tokens_per_s"] = sum(b.input_ids.numel() for b in batch) / (time.perf_counter() - t0)
        del m["nll_sum"]
        progress.update(1)
        progress.set_postfix(loss=f"{m['loss']:.3f}")
        if step % cfg.logging.log_every == 0 or step == cfg.trainer.max_steps:
            writer.write({"step": step, **m}, echo=not progress.active)
        if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step != cfg.trainer.max_steps:
            writer.write({"step": step, **evaluate(model, eval_batches, device)}, echo=not progress.active)
    progress.close()
    final_eval = evaluate(model, eval_batches, device)
    writer.write({"step": cfg.trainer.max_steps, **final_eval})

    samples = sample_responses(model, tokenizer, eval_convs[:4], cfg)
    export = save_hf_model(model, out / "hf", tokenizer=tokenizer)
    summary = {
        "steps": cfg.trainer.max_steps,
        "train_tokens": tokens,
        "eval_loss_initial": first_eval["eval_loss"],
        "eval_loss_final": final_eval["eval_loss"],
        "eval_accuracy_final": final_eval["eval_accuracy"],
        "wall_s": round(time.perf_counter() - start, 2),
        "export": str(export),
        "samples": samples,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
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
    outs = generate(
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
        for p, o, conv in zip(prompts, outs, conversations)
    ]


class _progress:
    """A tqdm bar on an interactive terminal when enabled, a no-op otherwise."""

    def __init__(self, cfg: RunConfig) -> None:
        self.bar = None
        if cfg.logging.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.trainer.max_steps, desc="sft", unit="step")

    @property
    def active(self) -> bool:
        return self.bar is not None

    def update(self, n: int) -> None:
        if self.bar:
            self.bar.update(n)

    def set_postfix(self, **kw) -> None:
        if self.bar:
            self.bar.set_postfix(**kw)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
