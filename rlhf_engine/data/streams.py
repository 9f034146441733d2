"""Deterministic, resumable data order, and what one optimizer step of it is: micro-batches plus totals.

    stream = BatchStream(plan_epoch, build)                  # the global, seeded micro-batch order
    source = GlobalSteps(stream, grad_accum=4, dp=2, dp_rank=r)   # a trainer's StepSource over it
    step = source.next_step()      # Step(micro_batches=[this rank's share], totals=StepTotals({...}))

Every micro-batch type reports ``counts()``: named totals such as ``tokens`` (every real token, for
throughput), ``targets`` (SFT's label tokens), ``pairs`` and ``prompts`` (ranking RM), ``sequences``
and ``response_tokens`` (RL). ``StepTotals`` holds their sums over the *whole* optimizer step (every
micro-batch of every data-parallel rank); objectives divide by them, so gradient accumulation and data
parallelism are plain sums of backward passes. This is the one place normalisation comes from.

Splits and shuffles are seeded so every rank computes the same global order without communicating.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Mapping, Protocol, Sequence, TypeVar

import torch

from ..config import RunConfig
from .reader import DataError, read_rows

T = TypeVar("T")
P = TypeVar("P")


class Batch(Protocol):
    """What a micro-batch offers the trainer."""

    def counts(self) -> dict[str, float]: ...

    def to(self, device: torch.device | str) -> "Batch": ...


B = TypeVar("B", bound=Batch)


@dataclass(frozen=True)
class StepTotals:
    """Named totals over one optimizer step, all micro-batches and data-parallel ranks."""

    counts: Mapping[str, float]

    def __getitem__(self, name: str) -> float:
        if name not in self.counts:
            raise KeyError(f"no total {name!r} in this step (have: {', '.join(sorted(self.counts))})")
        return self.counts[name]

    @classmethod
    def of(cls, batches: Sequence[Batch]) -> "StepTotals":
        """Sums of the batches' counts (for a stream every rank generates in full)."""
        sums: dict[str, float] = {}
        for b in batches:
            for k, v in b.counts().items():
                sums[k] = sums.get(k, 0) + v
        return cls(sums)

    @classmethod
    def unit(cls, like: "StepTotals") -> "StepTotals":
        """Every total 1: an objective then returns plain sums (held-out evaluation divides at the end)."""
        return cls({k: 1 for k in like.counts})


@dataclass
class Step(Generic[B]):
    """One optimizer step as a rank sees it."""

    micro_batches: list[B]  # this rank's, on the CPU
    totals: StepTotals  # over the whole step (every rank)
    info: dict[str, Any] = field(default_factory=dict)  # anything the source reports with the step


class BatchStream(Generic[P, B]):
    """An endless, deterministic stream of micro-batches whose position can be saved and restored.

    ``plan_epoch(epoch)`` returns the epoch's micro-batch plans (cheap: index lists, from a shuffle
    seeded by the epoch); ``build(plan)`` materializes one batch. The position is (epoch, index), so a
    resumed run rebuilds the epoch's plan and continues from the same micro-batch. Every rank generates
    the same global stream and takes its share (``GlobalSteps``).
    """

    def __init__(self, plan_epoch: Callable[[int], Sequence[P]], build: Callable[[P], B]) -> None:
        self.plan_epoch, self.build = plan_epoch, build
        self.epoch, self.index = 0, 0
        self._plans: Sequence[P] | None = None

    def take(self, n: int) -> list[B]:
        out = []
        while len(out) < n:
            if self._plans is None:
                self._plans = self.plan_epoch(self.epoch)
                if not self._plans:
                    raise ValueError("the training data yields no micro-batch (fewer rows than micro_batch_size?)")
            if self.index >= len(self._plans):
                self.epoch, self.index, self._plans = self.epoch + 1, 0, None
                continue
            out.append(self.build(self._plans[self.index]))
            self.index += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._plans = int(state["epoch"]), int(state["index"]), None


class GlobalSteps(Generic[B]):
    """A ``trainer.StepSource`` over a global ``BatchStream``: each step takes ``grad_accum * dp``
    micro-batches, gives rank r the micro-batches r, r + dp, ..., and totals them all."""

    def __init__(self, stream: BatchStream[Any, B], grad_accum: int, dp: int = 1, dp_rank: int = 0) -> None:
        self.stream, self.grad_accum, self.dp, self.dp_rank = stream, grad_accum, dp, dp_rank

    def next_step(self) -> Step[B]:
        batches = self.stream.take(self.grad_accum * self.dp)
        return Step(batches[self.dp_rank :: self.dp], StepTotals.of(batches))

    def after_step(self, record: dict[str, float]) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)

    def rank_state(self) -> dict[str, Any] | None:
        return None  # the position is global: nothing per rank

    def load_rank_state(self, state: dict[str, Any] | None) -> None:
        pass

    def close(self) -> None:
        pass  # no background work


def shuffled(n: int, seed: int, epoch: int) -> list[int]:
    """The epoch's order of ``n`` rows: a shuffle seeded by (seed, epoch), the same on every rank."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def split_rows(rows: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held out): a seeded shuffle, ``fraction`` of the rows held out (at least one when > 0)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(rows) * fraction)) if fraction > 0 else 0
    if n_eval >= len(rows):
        raise ValueError(f"cannot hold out {n_eval} of {len(rows)} rows; add data or lower data.eval_fraction")
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def load_split(cfg: RunConfig, parse: Callable[[Any], T], builtin: Callable[[], list[T]] | None = None,
               ) -> tuple[list[T], list[T]]:
    """(train, held-out) rows: ``data.train_path`` parsed row by row (or ``builtin()`` without one), and
    ``data.eval_path`` or a seeded ``data.eval_fraction`` split of the training rows."""
    d = cfg.data
    if d.train_path is None and builtin is None:
        raise DataError(f"algorithm '{cfg.algorithm.name}' needs data.train_path (row formats: docs/data.md)")
    train = read_rows(d.train_path, parse) if d.train_path is not None else builtin()
    if d.eval_path is not None:
        return train, read_rows(d.eval_path, parse)
    return split_rows(train, d.eval_fraction, cfg.trainer.seed)
