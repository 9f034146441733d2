"""The algorithm-agnostic training loop shared by every stage.

    source = GlobalSteps(BatchStream(plan_epoch, build), grad_accum, dp, dp_rank)   # or ExperienceStream
    trainer = Trainer(cfg, rt, model, objective, source, name="dpo", eval_batches=held_out)
    result = trainer.fit()                               # resumes from <out_dir>/checkpoints if asked

The trainer consumes a ``StepSource``: each ``next_step()`` is this rank's micro-batches and the
step's ``StepTotals`` over every rank (``data/streams.py``). An ``Objective`` (``algorithms/objective.py``)
turns a micro-batch into its loss, already divided by those totals, so gradient accumulation and data
parallelism are plain sums of backward passes, and into stat *sums* that the trainer adds over
micro-batches and ranks and divides by the total each names. Parameter groups with their own peak
learning rate (the RL critic, adapters) are passed in by the stage (``ParamGroup``).

The trainer owns everything else: the AdamW optimizer and LR schedule (warmup + cosine/linear), gradient
accumulation and clipping, evaluation (the same objective, no gradients), metrics (loss, per-objective
stats, grad norm, LR, tokens/s, peak memory) to ``metrics.jsonl`` and TensorBoard with a progress bar on a
terminal, and atomic checkpoints. A resumed run restores model, optimizer, schedule, RNG and the data
stream's position, so on CPU it continues bit for bit as if it had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

import torch
from torch import nn
from tqdm import tqdm

from .algorithms.objective import Objective, is_maximum, merge_stats
from .config import OptimConfig, RunConfig
from .data.streams import Batch, Step, StepTotals
from .faults import StopSignals, Stopped, TrainingError, finite_or_none
from .optimizer import MasterWeightAdamW, has_low_precision
from .parallel.checkpoint import (
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    load_rank_state,
    save_checkpoint,
)
from .parallel.fp8 import fp8_metrics
from .parallel.grads import grad_of
from .parallel.pipeline import PipelinedModel
from .parallel.runtime import Runtime

B = TypeVar("B", bound=Batch)


class StepSource(Protocol[B]):
    """What the trainer consumes: steps, and the position to checkpoint and restore."""

    def next_step(self) -> Step[B]:
        """This rank's micro-batches of the next optimizer step, and the step's totals over all ranks."""

    def after_step(self, record: dict[str, float]) -> dict[str, float]:
        """Sees the step's global metrics; returns extra metrics to log with it (e.g. a rollout's)."""

    def state_dict(self) -> dict[str, Any]:
        """The global position (the same on every rank), saved in the checkpoint's progress record."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def rank_state(self) -> dict[str, Any] | None:
        """This rank's own state (e.g. its rollout buffer), saved beside the checkpoint; None: nothing."""

    def load_rank_state(self, state: dict[str, Any] | None) -> None: ...

    def close(self) -> None:
        """Called when ``fit`` ends, however it ends: stop any background work (off-policy sampling)."""


# ---------------------------------------------------------------------------------------------- optimizer


@dataclass(frozen=True)
class ParamGroup:
    """Trainable parameters whose qualified name ``match``es get their own peak ``lr`` (same schedule)."""

    name: str
    match: Callable[[str], bool]
    lr: float


def build_optimizer(model: nn.Module, cfg: OptimConfig, groups: Sequence[ParamGroup] = ()) -> torch.optim.Optimizer:
    """AdamW; weight decay on parameters with ndim >= 2 only (norm gains and biases are not decayed).
    Parameters matched by none of ``groups`` train at ``optim.lr``; each group at its own rate. Trainable
    parameters in bf16/fp16 (``precision.dtype=bfloat16`` without FSDP) get fp32 master weights
    (``optimizer.MasterWeightAdamW``): AdamW on the bf16 weights themselves would round small updates away."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        if isinstance(model, PipelinedModel):  # a stage of the frozen trunk alone: nothing to step
            return torch.optim.AdamW([{"params": [], "lr": cfg.lr}], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        raise ValueError("the model has no trainable parameters")
    owner = [next((i for i, g in enumerate(groups) if g.match(n)), -1) for n, _ in named]
    out = []
    for i in range(-1, len(groups)):
        mine = [p for (_, p), o in zip(named, owner) if o == i]
        lr = cfg.lr if i < 0 else groups[i].lr
        for decay in (True, False):
            params = [p for p in mine if (p.ndim >= 2) == decay]
            if params:
                out.append({"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": lr})
    if has_low_precision(p for _, p in named):
        return MasterWeightAdamW(out, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.AdamW(out, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of cfg.lr at optimizer step ``step`` (0-based): linear warmup, then the decay schedule
    from 1 down to min_lr_ratio at ``max_steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: Sequence[Any],
    objective: Objective,
    grad_clip: float | None,
    *,
    totals: StepTotals | None = None,
    loss_scale: float = 1.0,
    agree: Callable[[list[bool]], list[bool]] | None = None,
    stop_requested: bool = False,
) -> dict[str, float]:
    """Accumulate gradients over ``micro_batches``, clip, step; returns this rank's sums and the step's
    grad norm and LR. A step whose loss or gradient norm is not finite on any rank is skipped (no
    update, the schedule does not advance): ``skipped`` is 1. ``agree`` makes every rank see the same
    flags (any rank's bad step or stop request); ``stop`` reports the agreed stop request.

    ``totals``: the step's totals across data-parallel ranks (default: of these micro-batches).
    ``loss_scale``: multiplies each loss before backward; the data-parallel degree under FSDP, which
    averages gradients over ranks while the loss is already a global mean.
    """
    model.train()
    if totals is None:
        totals = StepTotals.of(micro_batches)
    loss_total, stats_total = forward_backward(model, objective, micro_batches, totals, train=True,
                                               loss_scale=loss_scale)
    grad_norm = clip_model_grads(model, grad_clip)
    flags = [not (math.isfinite(loss_total) and math.isfinite(grad_norm)), stop_requested]
    bad, stop = agree(flags) if agree is not None else flags  # one all-reduce: every rank skips or steps
    lr = scheduler.get_last_lr()[0]
    if not bad:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients are dropped with the rest
    return {"loss": loss_total, "grad_norm": float(grad_norm), "lr": lr, **stats_total,
            "skipped": float(bad), "stop": float(stop)}


def forward_backward(model: nn.Module, objective: Objective, micro_batches: Sequence[Any], totals: StepTotals, *,
                     train: bool, loss_scale: float = 1.0) -> tuple[float, dict[str, float]]:
    """The summed loss and stat sums of ``micro_batches``, with gradients accumulated when ``train``.

    One process (or TP/FSDP): each micro-batch's passes run on the model and backward follows. Under
    pipeline parallelism every pass of every micro-batch is one pipeline micro-batch, run by the
    configured schedule (``parallel/pipeline.py``), and the numbers come back from the last stage."""
    if isinstance(model, PipelinedModel):
        passes = [p for mb in micro_batches for p in objective.passes(mb)]
        return model.run(passes, totals, train=train, loss_scale=loss_scale)
    loss_total, stats_total = 0.0, {}
    for mb in micro_batches:
        loss, stats = objective(model, mb, totals)
        if train:
            (loss * loss_scale).backward()
        loss_total += float(loss.detach())
        merge_stats(stats_total, stats)
    return loss_total, stats_total


def clip_model_grads(model: nn.Module, max_norm: float | None) -> float:
    """``clip_grad_norm`` over the model's gradients; under pipeline parallelism the global norm of every
    stage's gradients (a tied weight counted once)."""
    if isinstance(model, PipelinedModel):
        return clip_grad_norm(model.grad_norm_params(), max_norm, reduce=model.reduce_squares,
                              also=[p for p in model.parameters() if grad_of(p) is not None])
    return clip_grad_norm([p for p in model.parameters() if grad_of(p) is not None], max_norm)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float | None, *,
                   reduce: Callable[[float], float] | None = None, also: Sequence[nn.Parameter] = ()) -> float:
    """Global gradient 2-norm, then scale gradients to at most ``max_norm``. Parameters may mix DTensors on
    different meshes (TP+FSDP weights on (dp, tp), norm gains FSDP-sharded on dp only: each group's norm is
    reduced over its own mesh) and plain tensors (replicated, e.g. norm gains under TP alone: the same on
    every rank), which torch's clip refuses.

    ``reduce``: sums the squared norm over other ranks holding other parameters (pipeline stages);
    ``also``: parameters scaled with the rest but not counted (a tied weight's second copy)."""
    groups: dict[Any, list[torch.Tensor]] = {}  # by mesh: TP+FSDP weights are 2-D, FSDP-only norm gains 1-D
    for p in params:
        grad = grad_of(p)  # (fp32 main_grad of a bf16 parameter: parallel/grads.py)
        groups.setdefault(getattr(grad, "device_mesh", None), []).append(grad)
    squares = 0.0
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        squares += float(norm) ** 2
    if reduce is not None:
        squares = reduce(squares)
    total = math.sqrt(squares)
    if max_norm is not None and total > max_norm:
        coef = max_norm / (total + 1e-6)
        scaled: dict[Any, dict[int, torch.Tensor]] = {}  # mesh (or plain) -> gradients, each once
        for p in [*params, *also]:
            grad = grad_of(p)
            scaled.setdefault(getattr(grad, "device_mesh", None), {})[id(p)] = grad
        for grads in scaled.values():  # (a pipeline stage of the frozen trunk alone has none)
            torch._foreach_mul_(list(grads.values()), coef)
    return total


# ---------------------------------------------------------------------------------------------- metrics


class MetricsWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` and echoes it to the terminal.

    Several stages share one file (a pipeline run); each record carries its ``stage``. Opening a stage at
    step s drops that stage's records after s (a fresh start: all of them; a resumed run: the ones a
    killed process wrote after its last checkpoint), so the file always reads as one uninterrupted run.
    """

    def __init__(self, out_dir: str | os.PathLike, *, stage: str | None = None, from_step: int = 0,
                 max_steps: int | None = None) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.kept: list[dict[str, Any]] = []
        if stage is not None and self.path.exists():
            lines = []
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a killed process or a full disk
                    warnings.warn(f"{self.path}:{n}: dropped a damaged metrics line ({line[:60]!r})", stacklevel=2)
                    continue
                if not _stale(record, stage, from_step, max_steps):
                    lines.append(line)
                    self.kept.append(record)
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in lines))
            tmp.replace(self.path)
        self.start = time.perf_counter()

    def write(self, record: dict[str, Any], echo: bool = True, prefix: str = "") -> None:
        """Append ``record``; with ``echo``, also print it (after ``prefix``, e.g. 'step 20/150, ETA 1m05s')."""
        record = finite_or_none({"time_s": round(time.perf_counter() - self.start, 3), **record})
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        except OSError as exc:
            raise TrainingError(f"cannot append to {self.path}: {exc.strerror or exc}") from None
        if echo:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
            print(prefix + shown, file=sys.stderr, flush=True)


def _stale(record: dict[str, Any], stage: str, from_step: int, max_steps: int | None = None) -> bool:
    """A record of ``stage`` that a run opening at ``from_step`` writes again: all on a fresh start; after a
    resume, those past the checkpoint, and the final evaluation when resuming at the last step (a run
    killed between its final evaluation and its export evaluates again)."""
    if record.get("stage") != stage:
        return False
    step = record.get("step", 0)
    final_eval = max_steps is not None and from_step == max_steps == step and "loss" not in record \
        and any(k.startswith("eval_") for k in record)
    return from_step == 0 or step > from_step or final_eval


class RunLog:
    """Rank 0's sinks: ``metrics.jsonl`` (every record, tagged with the stage), TensorBoard scalars under
    ``tb/`` (``<stage>/<key>``) and a tqdm bar on an interactive terminal. Other ranks get a no-op."""

    def __init__(self, cfg: RunConfig, out: Path, *, stage: str, enabled: bool, first_step: int = 0) -> None:
        self.stage = stage
        self.first_step, self.max_steps, self.started = first_step, cfg.trainer.max_steps, time.perf_counter()
        self.writer = MetricsWriter(out, stage=stage, from_step=first_step, max_steps=cfg.trainer.max_steps) \
            if enabled else None
        self.tb = _tensorboard(out / "tb", first_step) if enabled and cfg.logging.tensorboard else None
        self.bar = None
        if enabled and cfg.logging.progress_bar and sys.stderr.isatty():
            self.bar = tqdm(total=cfg.trainer.max_steps, initial=first_step, desc=stage, unit="step")

    def write(self, step: int, record: dict[str, Any], echo: bool | None = None) -> None:
        if self.writer is None:
            return
        self.writer.write({"stage": self.stage, "step": step, **record},
                          echo=(self.bar is None) if echo is None else echo, prefix=self._progress(step))
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{self.stage}/{k}", v, step)

    def _progress(self, step: int) -> str:
        """'stage step x/N, ETA ..' for the printed lines (a terminal has the bar instead)."""
        done = step - self.first_step
        text = f"[{self.stage} {step}/{self.max_steps}"
        if done > 0 and step < self.max_steps:
            eta = (time.perf_counter() - self.started) / done * (self.max_steps - step)
            text += f", ETA {int(eta // 60)}m{int(eta % 60):02d}s"
        return text + "] "

    def first_eval(self) -> dict[str, Any]:
        """The stage's evaluation before training, from the records a resumed run kept (rank 0)."""
        for r in self.writer.kept if self.writer is not None else []:
            if r.get("stage") == self.stage and r.get("step") == 0 and "loss" not in r:
                return {k: v for k, v in r.items() if k.startswith("eval_")}
        return {}

    def advance(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}" if math.isfinite(loss) else "non-finite")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard(path: Path, first_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: a trimmed environment trains without it
    except ImportError:  # tensorboard is a dependency; a trimmed environment still trains
        warnings.warn("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)", stacklevel=3)
        return None
    # purge_step drops events a killed run wrote after its last checkpoint, so curves do not double back
    return SummaryWriter(str(path), purge_step=first_step + 1 if first_step else None)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------- the loop


class Trainer(Generic[B]):
    """Steps ``model`` on ``objective`` over ``source`` (see the module docstring).

    ``eval_batches``: held-out micro-batches, evaluated by every rank with the same objective at step 0,
    every ``trainer.eval_every`` steps and at the end. ``evaluate``: an extra hook returning more
    held-out metrics (e.g. generation samples, accuracy on another set). ``param_groups``: parameters
    with their own peak learning rate.
    """

    def __init__(
        self,
        cfg: RunConfig,
        rt: Runtime,
        model: nn.Module,
        objective: Objective,
        source: StepSource[B],
        *,
        name: str,
        eval_batches: Sequence[B] = (),
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        param_groups: Sequence[ParamGroup] = (),
    ) -> None:
        self.cfg, self.rt, self.model, self.objective, self.source = cfg, rt, model, objective, source
        self.name = name
        self.eval_batches = list(eval_batches)
        self.extra_eval = evaluate
        self.out = Path(cfg.trainer.out_dir)
        self.ckpt_dir = self.out / "checkpoints" / name
        self.optimizer = build_optimizer(model, cfg.optim, param_groups)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)
        self.step = 0
        self.tokens = 0

    # ------------------------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        """Collective: model, optimizer, RNG (DCP, atomic) and the schedule, data position and counters."""
        local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731 (this rank's shard)
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(local(p.detach())).all())]
        if self.rt.any_rank([bool(bad)])[0]:  # every rank stops, not only the one holding the bad shard
            raise TrainingError(f"{self.name}: the model holds non-finite values at step {self.step} "
                                f"({', '.join(bad[:3]) or 'on another rank'}); nothing was saved, the last "
                                f"checkpoint under {self.ckpt_dir} is intact; lower optim.lr or set optim.grad_clip")
        progress = {"stage": self.name, "tokens": self.tokens, "stream": self.source.state_dict(),
                    "scheduler": self.scheduler.state_dict()}
        path = save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, progress=progress,
                               rank_state=self.source.rank_state())
        self._prune()
        return path

    def _prune(self) -> None:
        keep = self.cfg.trainer.keep_checkpoints
        if not self.rt.is_main or keep <= 0:
            return
        done = sorted(p for p in self.ckpt_dir.glob("step_*") if p.suffix != ".tmp")
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> bool:
        """Load the checkpoint ``trainer.resume`` names ('auto': the latest complete one of this stage, if
        any). A checkpoint that cannot be loaded (truncated, corrupt) is named in a warning and the one
        before it is tried; when none loads, one error names the newest and the way to start fresh."""
        choice = self.cfg.trainer.resume
        if choice == "never":
            return False
        candidates = complete_checkpoints(self.ckpt_dir) if choice == "auto" else [Path(choice)]
        failures = []
        for path in candidates:
            try:
                progress = load_checkpoint(path, self.model, self.optimizer)
            except BaseException as exc:  # DCP's CheckpointException is a BaseException; any failure to read it
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                reason = lines[-1][:300] if lines else type(exc).__name__  # DCP wraps the cause in a traceback
                failures.append(f"{path}: {reason}")
                if self.rt.is_main:
                    warnings.warn(f"cannot resume from {path} ({reason}); trying the checkpoint before it",
                                  stacklevel=2)
                continue
            if progress.get("stage", self.name) != self.name:
                raise TrainingError(f"{path} is a checkpoint of stage {progress['stage']!r}, not {self.name!r}")
            self.step, self.tokens = int(progress["step"]), int(progress["tokens"])
            self.scheduler.load_state_dict(progress["scheduler"])
            self.source.load_state_dict(progress["stream"])
            self.source.load_rank_state(load_rank_state(path))
            return True
        if failures:
            raise TrainingError(f"{self.name}: cannot resume from any checkpoint under {self.ckpt_dir} ({failures[0]}); "
                                "if the model, its shape or the layout changed since it was saved, start fresh "
                                "with trainer.resume=never or another trainer.out_dir")
        return False

    # ------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective on the held-out batches: means over the whole held-out set (``eval_`` prefixed)."""
        out: dict[str, float] = {}
        if self.eval_batches:
            self.model.eval()
            totals = StepTotals.of(self.eval_batches)
            unit = StepTotals.unit(totals)  # the objective then returns sums; divided below
            batches = [b.to(self.rt.device) for b in self.eval_batches]
            loss, sums = forward_backward(self.model, self.objective, batches, unit, train=False)
            mean = lambda v, count: v / max(totals[count], 1)  # noqa: E731
            out = {"eval_loss": mean(loss, self.objective.target),
                   **{f"eval_{k}": v if is_maximum(k) else mean(v, self.objective.count_of(k)) for k, v in sums.items()}}
        if self.extra_eval is not None:
            out.update(self.extra_eval(self.model))
        return out

    # ------------------------------------------------------------------------------------ training

    def fit(self, resumed: bool | None = None) -> dict[str, Any]:
        """Run (or continue) to ``trainer.max_steps`` (or ``trainer.stop_after``); returns the first and
        final evaluations and counters. Rank 0 writes the logs. ``resumed``: ``resume()`` was already
        called (and returned this); else it is called here.

        A stop signal (``faults.StopSignals``) ends the run after the current step with a checkpoint and
        ``faults.Stopped``; ``trainer.max_bad_steps`` non-finite steps in a row end it with
        ``faults.TrainingError``, the last good checkpoint intact."""
        with StopSignals() as signals:
            try:
                return self._fit(self.resume() if resumed is None else resumed, signals)
            finally:
                self.source.close()

    def _fit(self, resumed: bool, signals: StopSignals) -> dict[str, Any]:
        cfg, rt = self.cfg, self.rt
        t = cfg.trainer
        log = RunLog(cfg, self.out, stage=self.name, enabled=rt.is_main, first_step=self.step)
        first_eval = log.first_eval() if resumed else self.evaluate()
        if first_eval and not resumed:
            log.write(self.step, first_eval)
        if resumed:
            log.write(self.step, {"resumed_from": self.step})
        last = min(t.max_steps, t.stop_after) if t.stop_after else t.max_steps
        bad_in_a_row = skipped = 0
        while self.step < last:
            t0 = time.perf_counter()  # data making counts: for RL it is the rollout (generation, scoring)
            step = self.source.next_step()
            mine = [b.to(rt.device) for b in step.micro_batches]
            m = train_step(self.model, self.optimizer, self.scheduler, mine, self.objective, cfg.optim.grad_clip,
                           totals=step.totals, loss_scale=rt.loss_scale, agree=rt.any_rank,
                           stop_requested=signals.requested is not None)
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)
            elapsed = time.perf_counter() - t0
            bad, stop = m.pop("skipped") > 0, m.pop("stop") > 0
            maxima = {k: rt.max_over_ranks(m.pop(k)) for k in [k for k in m if is_maximum(k)]}
            sums = rt.sum_over_dp({k: v for k, v in m.items() if k not in ("grad_norm", "lr")})
            self.step += 1
            step_tokens = int(step.totals["tokens"])
            self.tokens += step_tokens
            target = step.totals[self.objective.target]
            record = {"loss": sums.pop("loss"),
                      **{k: v / max(step.totals[self.objective.count_of(k)], 1) for k, v in sums.items()}, **maxima,
                      "grad_norm": m["grad_norm"], "lr": m["lr"], "targets": int(target),
                      "tokens_per_s": step_tokens / elapsed, "peak_mem_mb": round(peak_memory_mb(rt.device), 1),
                      "step_s": round(elapsed, 3)}
            if rt.world_size > 1:  # rank 0 writes the record; the busiest rank's memory is what must fit
                record["peak_mem_mb_max_rank"] = round(rt.max_over_ranks(peak_memory_mb(rt.device)), 1)
            bad_in_a_row = bad_in_a_row + 1 if bad else 0
            skipped += bad
            if skipped:
                record["skipped_steps"] = skipped  # non-finite loss or gradient norm: no update
            if cfg.precision.fp8 is not None:
                record.update(fp8_metrics(self.model))
            extra = self.source.after_step(record)
            record.update(extra)
            log.advance(record["loss"])
            if self.step % cfg.logging.log_every == 0 or self.step == last or extra or bad:
                log.write(self.step, record)
            if bad_in_a_row >= t.max_bad_steps:
                log.close()
                kept = latest_checkpoint(self.ckpt_dir)
                raise TrainingError(
                    f"{self.name}: {bad_in_a_row} steps in a row (to step {self.step}) had a non-finite loss or "
                    f"gradient norm and were skipped (trainer.max_bad_steps={t.max_bad_steps}); "
                    + (f"the last good checkpoint is {kept}" if kept else "no checkpoint was written")
                    + "; lower optim.lr or set optim.grad_clip")
            if t.eval_every and self.step % t.eval_every == 0 and self.step != t.max_steps:
                log.write(self.step, self.evaluate())
            if stop:  # every rank agreed in train_step: finish with a checkpoint (collective: all ranks save)
                path = self.save()
                log.close()
                raise Stopped(signals.requested or signal.SIGTERM, self.step, str(path))
            if t.save_every and (self.step % t.save_every == 0 or self.step == last):
                self.save()
        log.close()
        final_eval = self.evaluate() if self.step == t.max_steps else {}
        if final_eval:
            log.write(self.step, final_eval, echo=True)
        return {"step": self.step, "finished": self.step == t.max_steps, "tokens": self.tokens,
                "first_eval": first_eval, "final_eval": final_eval, "resumed": resumed, "skipped_steps": skipped}
