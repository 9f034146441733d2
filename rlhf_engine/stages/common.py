"""The stage skeleton every training stage runs, and what stages share around it.

    def setup(ctx: StageContext) -> StageSetup: ...       # what differs: data, model, objective, export
    summary = run_stage(cfg, "sft", setup)

``run_stage`` owns the sequence: runtime -> run directory (config recorded) -> the stage's own set-up
-> a one-line announcement -> ``Trainer.fit`` (resuming when asked) -> the stage's summary keys ->
export when the run finished -> ``summary.json``. A stage file holds only its set-up.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..algorithms.objective import Objective
from ..config import RunConfig, to_dict, to_yaml, validate
from ..data.streams import BatchStream, GlobalSteps
from ..data.tokenizer import train_bpe_tokenizer
from ..faults import finite_or_none
from ..models import Transformer, load_hf_model, load_tokenizer, save_hf_model
from ..models.lora import save_peft_adapters
from ..models.roles import Role
from ..parallel.checkpoint import gather_model
from ..parallel.runtime import Runtime, init_runtime
from ..trainer import ParamGroup, StepSource, Trainer


@dataclass
class StageContext:
    """What a stage's set-up receives: the config, the process runtime and the run directory."""

    cfg: RunConfig
    rt: Runtime
    out: Path

    def tokenizer(self, texts: Iterable[str]):
        return build_tokenizer(self.cfg, texts, self.rt, self.out)

    def steps(self, stream: BatchStream) -> GlobalSteps:
        """A global stream as this data-parallel rank's steps of ``trainer.grad_accum_steps`` micro-batches."""
        return GlobalSteps(stream, self.cfg.trainer.grad_accum_steps, self.rt.dims.dp, self.rt.dp_rank)


@dataclass
class StageSetup:
    """What differs between stages."""

    model: nn.Module  # parallelized
    objective: Objective
    source: StepSource
    description: str  # for the announcement: rows, heads, vocabulary...
    eval_batches: Sequence[Any] = ()
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    param_groups: Sequence[ParamGroup] = ()
    summarize: Callable[[dict[str, Any]], dict[str, Any]] = lambda result: {}  # stage keys from fit()'s result
    export: Callable[[Path], dict[str, Any]] | None = None  # collective, when the run finished; summary keys
    extra: dict[str, Any] = field(default_factory=dict)  # anything the set-up wants to keep


def run_stage(cfg: RunConfig, name: str, setup: Callable[[StageContext], StageSetup]) -> dict[str, Any]:
    """Run one training stage (module docstring); returns the summary also written to ``summary.json``."""
    start = time.perf_counter()
    rt = init_runtime(cfg)
    out = open_run(cfg, rt)
    s = setup(StageContext(cfg, rt, out))
    announce(rt, name, s.model, s.description)
    trainer = Trainer(cfg, rt, s.model, s.objective, s.source, name=name, eval_batches=s.eval_batches,
                      evaluate=s.evaluate, param_groups=s.param_groups)
    resumed = trainer.resume()  # an incompatible checkpoint stops here, before the recorded config changes
    record_config(cfg, rt, out)
    result = trainer.fit(resumed)
    summary: dict[str, Any] = {"steps": result["step"], "finished": result["finished"], "resumed": result["resumed"],
                               "world_size": rt.world_size, **s.summarize(result)}
    if result["finished"] and s.export is not None:
        summary.update(s.export(out))
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    write_summary(rt, out, summary)
    return summary


# ---------------------------------------------------------------------------------------------- shared pieces


def derive(cfg: RunConfig, source: str = "derived", **sections: dict[str, Any]) -> RunConfig:
    """``cfg`` with some keys replaced per section (one level of nesting merges), validated again."""
    tree = to_dict(cfg)
    for name, values in sections.items():
        tree[name] = {**(tree.get(name) or {}), **values}
    return validate(tree, source)


def single_process_run(cfg: RunConfig, refusal: str) -> tuple[Runtime, Path]:
    """The runtime and the created ``trainer.out_dir`` of a command that runs in one process (it starts
    stages itself); ``refusal`` says what to do instead when launched on several."""
    rt = init_runtime(cfg)
    if rt.world_size > 1:
        raise ValueError(refusal)
    out = Path(cfg.trainer.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return rt, out


def open_run(cfg: RunConfig, rt: Runtime) -> Path:
    """Create ``trainer.out_dir`` (rank 0); seed torch. The config is recorded by ``record_config`` once
    the run is known to start or resume."""
    torch.manual_seed(cfg.trainer.seed)
    out = Path(cfg.trainer.out_dir)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
    rt.barrier()
    return out


def record_config(cfg: RunConfig, rt: Runtime, out: Path) -> None:
    """Write the resolved config to ``<out_dir>/config.yaml`` (rank 0, write-then-rename)."""
    if rt.is_main:
        tmp = out / ".config.yaml.tmp"
        tmp.write_text(to_yaml(cfg))
        tmp.replace(out / "config.yaml")


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


def export_policy(model, out: Path, tokenizer, rt: Runtime, make_plain: Callable[[], nn.Module],
                  cfg: RunConfig) -> dict[str, Any]:
    """Collective: gather a (sharded) RoleModel and save its policy as a Hugging Face checkpoint (LoRA
    merged); with ``model.lora.export_peft`` also the policy's adapters in PEFT's format under ``peft/``."""
    plain = gather_model(model, make_plain)
    if plain is not None:
        save_hf_model(plain.policy_model(), out / "hf", tokenizer=tokenizer)
        if plain.lora is not None and cfg.model.lora.export_peft:
            save_peft_adapters(plain.head(Role.POLICY).state_dict(), cfg.model.lora, out / "peft",
                               base_model=cfg.model.hf_path)
    rt.barrier()
    return {"export": str(out / "hf")}


def announce(rt: Runtime, stage: str, model: torch.nn.Module, text: str) -> None:
    if rt.is_main:
        n = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        where = f" on pipeline rank 0 of {rt.dims.pp}" if rt.dims.pp > 1 else ""
        print(f"{stage}: {n / 1e6:.2f}M parameters{where} ({trainable / 1e6:.2f}M trainable), {text}, "
              f"{rt.world_size} process(es) on {rt.device.type}", file=sys.stderr)


def write_summary(rt: Runtime, out: Path, summary: dict[str, Any], name: str = "summary.json") -> None:
    if rt.is_main:  # valid JSON always: a non-finite number is written as null
        tmp = out / f".{name}.tmp"
        tmp.write_text(json.dumps(finite_or_none(summary), indent=2, allow_nan=False))
        tmp.replace(out / name)
