"""Pipeline schedules as per-rank action lists: GPipe, 1F1B and interleaved 1F1B.

    actions = schedule_actions("1f1b", rank=1, pp=4, chunks=1, microbatches=8)   # [F(1,0), F(1,1), B(1,0), ...]
    simulate(schedule_actions, "interleaved_1f1b", pp=2, chunks=2, microbatches=4)  # raises on a deadlock

A schedule is only an order: which (stage, micro-batch) forward or backward each rank runs next. The
executor (``parallel/pipeline.py``) runs the list, sending a stage's output to the next stage's rank
without waiting and blocking only to receive what the next action needs, so any order in which every
receive is eventually matched works; ``simulate`` checks that for every schedule in the tests.

With ``pp`` ranks and ``chunks`` stages per rank there are S = pp x chunks stages; stage s runs on rank
s mod pp (chunk s div pp), so with chunks > 1 each rank holds non-adjacent slices (Narayanan et al. 2021).

- **gpipe** (Huang et al. 2019): every forward, then every backward. Activations of all M micro-batches
  stay alive; the bubble is (pp - 1) / (M + pp - 1) of the step.
- **1f1b** (PipeDream-Flush, Narayanan et al. 2021): rank r runs pp - r - 1 warm-up forwards, then
  alternates one forward and one backward, then drains the backwards. Same bubble as GPipe, at most pp
  micro-batches' activations alive.
- **interleaved_1f1b** (Narayanan et al. 2021, Megatron's virtual pipeline): with chunks = v per rank the
  bubble shrinks v-fold. Micro-batches advance in groups of pp through each chunk in turn, so M must
  be a multiple of pp; warm-up is 2 (pp - r - 1) + (v - 1) pp forwards.
"""

from __future__ import annotations

from typing import NamedTuple

from .dims import LayoutError

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


class Action(NamedTuple):
    kind: str  # "F" forward, "B" backward
    stage: int  # global stage index
    mb: int  # micro-batch (pass) index


def schedule_actions(schedule: str, *, rank: int, pp: int, chunks: int, microbatches: int) -> list[Action]:
    """The actions of pipeline rank ``rank`` in order (module docstring)."""
    check_schedule(schedule, pp=pp, chunks=chunks, microbatches=microbatches)
    M = microbatches
    stages = [c * pp + rank for c in range(chunks)]
    if schedule == "gpipe":
        fwd = [Action("F", s, m) for s in stages for m in range(M)]
        return fwd + [Action("B", s, m) for s in reversed(stages) for m in range(M)]
    if schedule == "1f1b":
        (s,) = stages
        warmup = min(pp - rank - 1, M)
        out = [Action("F", s, m) for m in range(warmup)]
        for i in range(M - warmup):
            out += [Action("F", s, warmup + i), Action("B", s, i)]
        return out + [Action("B", s, m) for m in range(M - warmup, M)]
    # interleaved: the k-th forward of this rank is micro-batch m of chunk c, groups of pp micro-batches
    total = M * chunks

    def order(k: int, backward: bool) -> tuple[int, int]:
        group, within = divmod(k, pp * chunks)
        chunk, offset = divmod(within, pp)
        if backward:
            chunk = chunks - 1 - chunk
        return chunk * pp + rank, group * pp + offset

    warmup = min(2 * (pp - rank - 1) + (chunks - 1) * pp, total)
    out = [Action("F", *order(k, False)) for k in range(warmup)]
    for i in range(total - warmup):
        out += [Action("F", *order(warmup + i, False)), Action("B", *order(i, True))]
    return out + [Action("B", *order(k, True)) for k in range(total - warmup, total)]


def forward_only_actions(*, rank: int, pp: int, chunks: int, microbatches: int) -> list[Action]:
    """Evaluation: each micro-batch through this rank's stages in order, no backward."""
    return [Action("F", c * pp + rank, m) for m in range(microbatches) for c in range(chunks)]


def check_schedule(schedule: str, *, pp: int, chunks: int, microbatches: int) -> None:
    """Refuse a schedule that cannot run, naming the numbers and the fix."""
    if schedule not in SCHEDULES:
        raise LayoutError(f"unknown pipeline schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if chunks > 1 and schedule == "1f1b":
        raise LayoutError(f"parallel.pp_stages_per_rank={chunks} needs pp_schedule=interleaved_1f1b (or gpipe)")
    if schedule == "interleaved_1f1b" and microbatches % pp:
        raise LayoutError(f"interleaved_1f1b moves micro-batches in groups of pp: {microbatches} micro-batches per "
                          f"step is not a multiple of pp={pp}; set trainer.grad_accum_steps to a multiple of {pp}")


def simulate(schedule: str, *, pp: int, chunks: int, microbatches: int) -> int:
    """Run every rank's action list against the dependencies (F(s, m) after F(s-1, m); B(s, m) after
    F(s, m) and B(s+1, m)), one action per rank per tick when ready. Returns the ticks taken; raises
    RuntimeError if the ranks block each other (a deadlock) or an action is missing or repeated."""
    lists = {r: schedule_actions(schedule, rank=r, pp=pp, chunks=chunks, microbatches=microbatches) for r in range(pp)}
    S = pp * chunks
    expected = {Action(k, s, m) for k in "FB" for s in range(S) for m in range(microbatches)}
    got = [a for acts in lists.values() for a in acts]
    if len(got) != len(expected) or set(got) != expected:
        raise RuntimeError(f"{schedule}: the ranks' actions are not every F and B exactly once")
    done: set[Action] = set()
    pos = dict.fromkeys(lists, 0)
    ticks = 0
    while len(done) < len(expected):
        ready = []
        for r, acts in lists.items():
            if pos[r] == len(acts):
                continue
            a = acts[pos[r]]
            need = [Action("F", a.stage - 1, a.mb)] if a.kind == "F" and a.stage > 0 else []
            if a.kind == "B":
                need = [Action("F", a.stage, a.mb)] + ([Action("B", a.stage + 1, a.mb)] if a.stage < S - 1 else [])
            if all(n in done for n in need):
                ready.append((r, a))
        if not ready:
            raise RuntimeError(f"{schedule} deadlocks (pp={pp}, chunks={chunks}, M={microbatches}) at {pos}")
        for r, a in ready:
            done.add(a)
            pos[r] += 1
        ticks += 1
    return ticks
