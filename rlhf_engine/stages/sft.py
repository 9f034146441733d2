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

from typing import Any

import torch

from ..algorithms.sft import SFT
from ..config import RunConfig
from ..data.chat import pad_id, row_texts
from ..data.demonstrations import eval_batches, load_sft_rows, sft_stream, to_examples
from ..data.indexed import indexed_examples, is_indexed
from ..data.reader import DataError
from ..data.streams import split_rows
from ..models.lora import apply_lora
from ..parallel.checkpoint import export_hf
from ..rollout.sampling import sample_responses
from .common import StageContext, StageSetup, base_model, run_stage


def setup_sft(ctx: StageContext) -> StageSetup:
    cfg, rt, d = ctx.cfg, ctx.rt, ctx.cfg.data
    if d.train_path is not None and is_indexed(d.train_path):  # a Megatron corpus: fixed-length samples
        if cfg.model.tokenizer_path is None and cfg.model.hf_path is None:
            raise DataError(f"{d.train_path} is an indexed dataset: set model.tokenizer_path (or model.hf_path) "
                            "to the tokenizer it was preprocessed with")
        tokenizer = ctx.tokenizer(())
        train_ex, eval_ex = split_rows(indexed_examples(d.train_path, d.seq_len, cfg.trainer.seed), d.eval_fraction,
                                       cfg.trainer.seed)
        eval_rows = []
    else:
        train_rows, eval_rows = load_sft_rows(cfg)
        tokenizer = ctx.tokenizer(t for row in train_rows for t in row_texts(row))
        train_ex = to_examples(tokenizer, train_rows, d.seq_len)
        eval_ex = to_examples(tokenizer, eval_rows, d.seq_len)
    model = base_model(cfg, tokenizer)
    if cfg.model.lora.rank:  # adapters on the targeted linears; everything else frozen
        apply_lora(model, cfg.model.lora, torch.Generator().manual_seed(cfg.trainer.seed))
    model = rt.parallelize(model, cfg)
    pad = pad_id(tokenizer)

    def summarize(result: dict[str, Any]) -> dict[str, Any]:
        return {"train_tokens": result["tokens"], "eval_loss_initial": result["first_eval"].get("eval_loss"),
                "eval_loss_final": result["final_eval"].get("eval_loss"),
                "eval_accuracy_final": result["final_eval"].get("eval_accuracy")}

    def export(out) -> dict[str, Any]:
        export_hf(model, out / "hf", tokenizer=tokenizer, lora=cfg.model.lora, base=cfg.model.hf_path)
        # Sampling from a sharded model needs the tensor-parallel generator; load the export instead.
        chats = [r for r in eval_rows if not isinstance(r, str)][:4]
        return {"export": str(out / "hf"),
                "samples": sample_responses(model, tokenizer, chats, cfg) if rt.mesh is None else []}

    return StageSetup(model, SFT, ctx.steps(sft_stream(train_ex, cfg, pad, dp=rt.dims.dp)),
                      f"{len(train_ex)} train / {len(eval_ex)} eval rows, vocab {len(tokenizer)}",
                      eval_batches=eval_batches(eval_ex, cfg, pad), summarize=summarize, export=export)


def run_sft(cfg: RunConfig, name: str = "sft") -> dict[str, Any]:
    """Train, evaluate and export; returns the summary also written to ``<out_dir>/summary.json``.
    ``name`` tags the logs and checkpoints (the quickstart's next-token pretraining runs as ``pretrain``)."""
    return run_stage(cfg, name, setup_sft)
