"""What every stage does before and after training: the run directory, the tokenizer, the base model,
the held-out split, the summary."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch

from ..config import RunConfig, to_yaml
from ..data.tokenizer import train_bpe_tokenizer
from ..models import Transformer, load_hf_model, load_tokenizer
from ..parallel.runtime import Runtime

T = TypeVar("T")


def derive(cfg: RunConfig, source: str = "derived", **sections: dict[str, Any]) -> RunConfig:
    """``cfg`` with some keys replaced per section (one level of nesting merges), validated again."""
    from ..config import to_dict, validate

    tree = to_dict(cfg)
    for name, values in sections.items():
        tree[name] = {**(tree.get(name) or {}), **values}
    return validate(tree, source)


def open_run(cfg: RunConfig, rt: Runtime) -> Path:
    """Create ``trainer.out_dir`` and record the resolved config (rank 0); seed torch."""
    torch.manual_seed(cfg.trainer.seed)
    out = Path(cfg.trainer.out_dir)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    rt.barrier()
    return out


def split_rows(rows: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held out): a seeded shuffle, ``fraction`` of the rows held out (at least one when > 0)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(rows) * fraction)) if fraction > 0 else 0
    if n_eval >= len(rows):
        raise ValueError(f"cannot hold out {n_eval} of {len(rows)} rows; add data or lower data.eval_fraction")
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def load_split(cfg: RunConfig, parse: Callable[[Any], T], builtin: Callable[[], list[T]]) -> tuple[list[T], list[T]]:
    """(train, held-out) rows: ``data.train_path`` parsed row by row (or ``builtin()`` without one), and
    ``data.eval_path`` or a seeded ``data.eval_fraction`` split of the training rows."""
    from ..data.reader import read_rows

    d = cfg.data
    train = read_rows(d.train_path, parse) if d.train_path is not None else builtin()
    if d.eval_path is not None:
        return train, read_rows(d.eval_path, parse)
    return split_rows(train, d.eval_fraction, cfg.trainer.seed)


def shuffled(n: int, seed: int, epoch: int) -> list[int]:
    """The epoch's order of ``n`` rows: a shuffle seeded by (seed, epoch), the same on every rank."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def build_tokenizer(cfg: RunConfig, texts: Iterable[str], rt: Runtime, out: Path):
    """The configured tokenizer, or (scratch model without one) a byte-level BPE trained on ``texts`` once,
    on rank 0, saved under ``<out_dir>/tokenizer``."""
    m = cfg.model
    path = m.tokenizer_path or m.hf_path
    if path is None:
        path = out / "tokenizer"
        if rt.is_main:
            train_bpe_tokenizer(texts, vocab_size=m.architecture.vocab_size).save_pretrained(path)
        rt.barrier()
    return load_tokenizer(path)


def base_model(cfg: RunConfig, tokenizer) -> Transformer:
    """The decoder every stage starts from: the HF checkpoint ``model.hf_path``, or ``model.architecture``
    initialised from ``trainer.seed`` (identically on every rank). On CPU, unsharded."""
    m = cfg.model
    if m.hf_path is not None:
        model = load_hf_model(m.hf_path)
    else:
        model = Transformer(m.architecture)
        model.reset_parameters(torch.Generator().manual_seed(cfg.trainer.seed))
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}")
    return model


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def announce(rt: Runtime, stage: str, model: torch.nn.Module, text: str) -> None:
    if rt.is_main:
        n = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{stage}: {n / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), {text}, "
              f"{rt.world_size} process(es) on {rt.device.type}", file=sys.stderr)


def write_summary(rt: Runtime, out: Path, summary: dict[str, Any], name: str = "summary.json") -> None:
    if rt.is_main:
        tmp = out / f".{name}.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(out / name)
