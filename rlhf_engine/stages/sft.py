"""Supervised fine-tuning on chat demonstrations (InstructGPT step 1), loss on assistant tokens only.

    rlhf-engine sft --config configs/sft_tiny.yaml [key=value ...]
    scripts/torchrun.sh 4 sft --config configs/sft_tiny.yaml parallel.tp=2 parallel.dp_shard=2

Reads ``{"messages": [...]}`` JSONL (or the built-in demo set), renders each conversation with the
tokenizer's chat template, packs conversations into rows of ``data.seq_len`` tokens, trains, evaluates
on held-out conversations, prints sample responses, and exports the model with its tokenizer as a
Hugging Face checkpoint under ``<out_dir>/hf``. Under torchrun the model is tensor-parallel and/or
FSDP-sharded as ``parallel.*`` says, each data-parallel rank trains on its share of the micro-batches,
and rank 0 writes the run directory.
"""

from __future__ import annotations

import json
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
from ..models import Transformer, load_hf_model, load_tokenizer
from ..parallel.checkpoint import export_hf
from ..parallel.runtime import Runtime, init_runtime
from ..rollout import generate
from ..trainer import MetricsWriter, build_optimizer, build_scheduler, train_step


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


def build_model_and_tokenizer(cfg: RunConfig, corpus: list[list[Message]], rt: Runtime, out: Path):
    """The model (from an HF checkpoint or initialised from scratch, identically on every rank), laid out
    as ``parallel.*`` says, and its tokenizer (a scratch tokenizer is trained once, on rank 0)."""
    m = cfg.model
    tok_path = m.tokenizer_path or m.hf_path
    if tok_path is None:
        tok_path = out / "tokenizer"
        if rt.is_main:
            texts = (f"{msg.role}\n{msg.content}" for conv in corpus for msg in conv)
            train_bpe_tokenizer(texts, vocab_size=m.architecture.vocab_size).save_pretrained(tok_path)
        rt.barrier()
    tokenizer = load_tokenizer(tok_path)
    if m.hf_path is not None:
        model = load_hf_model(m.hf_path)
    else:
        model = Transformer(m.architecture)
        model.reset_parameters(torch.Generator().manual_seed(cfg.trainer.seed))
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}")
    return rt.parallelize(model, cfg), tokenizer


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
    """Token-mean NLL and next-token accuracy on assistant tokens of held-out conversations (every rank
    evaluates the same batches)."""
    model.eval()
    nll = correct = targets = 0.0
    for b in batches:
        _, stats = sft_loss(model, b.to(device), 1)
        nll, correct, targets = nll + stats["nll_sum"], correct + stats["correct"], targets + stats["targets"]
    return {"eval_loss": nll / max(targets, 1), "eval_accuracy": correct / max(targets, 1)}


def run_sft(cfg: RunConfig) -> dict[str, Any]:
    """Train, evaluate and export; returns the summary also written to ``<out_dir>/summary.json``."""
    start = time.perf_counter()
    rt = init_runtime(cfg)
    torch.manual_seed(cfg.trainer.seed)
    out = Path(cfg.trainer.out_dir)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
        (out / "metrics.jsonl").unlink(missing_ok=True)
    rt.barrier()

    train_convs, eval_convs = load_conversations(cfg)
    model, tokenizer = build_model_and_tokenizer(cfg, train_convs, rt, out)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_ex = to_examples(tokenizer, train_convs, cfg.data.seq_len)
    eval_ex = to_examples(tokenizer, eval_convs, cfg.data.seq_len)
    eval_rows = pack(eval_ex, cfg.data.seq_len)
    mbs = cfg.trainer.micro_batch_size
    eval_batches = [collate(eval_ex, eval_rows[i : i + mbs], cfg.data.seq_len, pad_id)
                    for i in range(0, len(eval_rows), mbs)][: cfg.trainer.eval_batches]
    n_params = sum(p.numel() for p in model.parameters())
    if rt.is_main:
        print(f"sft: {n_params / 1e6:.2f}M parameters, {len(train_ex)} train / {len(eval_ex)} eval conversations, "
              f"vocab {len(tokenizer)}, {rt.world_size} process(es) on {rt.device.type}", file=sys.stderr)

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)
    writer = MetricsWriter(out) if rt.is_main else None
    stream = rt.my_share(micro_batches(train_ex, cfg, pad_id))
    first_eval = evaluate(model, eval_batches, rt.device)
    log = _Log(writer, _progress(cfg) if rt.is_main else None)
    log.write({"step": 0, **first_eval})
    tokens = 0
    for step in range(1, cfg.trainer.max_steps + 1):
        batch = [next(stream).to(rt.device) for _ in range(cfg.trainer.grad_accum_steps)]
        t0 = time.perf_counter()
        local = {"targets": sum(b.num_targets for b in batch), "tokens": sum(b.input_ids.numel() for b in batch)}
        n_global = int(rt.sum_over_dp({"targets": local["targets"]})["targets"])
        m = train_step(model, optimizer, scheduler, batch, sft_loss, cfg.optim.grad_clip,
                       num_targets=n_global, loss_scale=rt.loss_scale)
        sums = rt.sum_over_dp({"loss": m["loss"], "correct": m["correct"], "tokens": local["tokens"]})
        tokens += int(sums["tokens"])
        record = {"loss": sums["loss"], "accuracy": sums["correct"] / max(n_global, 1), "grad_norm": m["grad_norm"],
                  "lr": m["lr"], "targets": n_global, "tokens_per_s": sums["tokens"] / (time.perf_counter() - t0)}
        log.step(record["loss"])
        if step % cfg.logging.log_every == 0 or step == cfg.trainer.max_steps:
            log.write({"step": step, **record})
        if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step != cfg.trainer.max_steps:
            log.write({"step": step, **evaluate(model, eval_batches, rt.device)})
    log.close()
    final_eval = evaluate(model, eval_batches, rt.device)
    log.write({"step": cfg.trainer.max_steps, **final_eval}, echo=True)

    export = export_hf(model, out / "hf", tokenizer=tokenizer)
    samples = sample_responses(model, tokenizer, eval_convs[:4], cfg) if rt.mesh is None else []
    summary = {
        "steps": cfg.trainer.max_steps,
        "world_size": rt.world_size,
        "train_tokens": tokens,
        "eval_loss_initial": first_eval["eval_loss"],
        "eval_loss_final": final_eval["eval_loss"],
        "eval_accuracy_final": final_eval["eval_accuracy"],
        "wall_s": round(time.perf_counter() - start, 2),
        "export": str(out / "hf"),
        # Sampling from a sharded model needs the tensor-parallel generator; load the export instead.
        "samples": samples,
    }
    if rt.is_main:
        assert export is not None
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


class _Log:
    """Metrics to metrics.jsonl and the terminal on rank 0, and the progress bar."""

    def __init__(self, writer: MetricsWriter | None, progress: "_progress | None") -> None:
        self.writer, self.progress = writer, progress

    def write(self, record: dict[str, Any], echo: bool | None = None) -> None:
        if self.writer is not None:
            active = self.progress is not None and self.progress.active
            self.writer.write(record, echo=(not active) if echo is None else echo)

    def step(self, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{loss:.3f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


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
