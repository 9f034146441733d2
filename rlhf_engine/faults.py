"""What a run does when something goes wrong: stop signals, non-finite steps, and the errors it reports.

    with StopSignals() as signals:          # SIGTERM / SIGUSR1 (preemption), SIGINT (Ctrl-C)
        ... train a step ...
        if signals.requested: save, then raise Stopped(signals.requested, ...)

- **Preemption.** Slurm sends SIGTERM at a time limit or preemption (and a chosen signal ahead of it with
  ``--signal``); torchrun forwards it to every rank. The handler only records it: the current step
  finishes, every rank agrees at the step's end (the non-finite check's all-reduce carries the flag),
  a checkpoint is written and the process exits with ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL), which the
  sbatch script requeues. Ctrl-C does the same with exit code 130; a second Ctrl-C stops at once.
- **Errors** live here, torch-free, so the command line can report them without importing torch:
  ``LayoutError`` (re-exported by ``parallel.dims``), ``CheckpointError``, ``TrainingError``.
- **Non-finite steps.** ``TrainingError`` ends a run after ``trainer.max_bad_steps`` non-finite steps in
  a row (each is skipped: no optimizer update), or when a model about to be saved holds a non-finite
  value. Metrics and summaries write non-finite numbers as null, so they stay valid JSON.
"""

from __future__ import annotations

import math
import signal
import threading
from typing import Any

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again (the sbatch script requeues on it)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_TRAINING_ERROR = 1


class LayoutError(ValueError):
    """A parallel layout does not fit the world size or the model; the message names the numbers."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (space, I/O); one line names the path."""


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite training, an unusable checkpoint): one line says why and what to do."""


class Stopped(Exception):
    """A stop signal was honoured: a checkpoint was written (if the run checkpoints) and the run ended."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        saved = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (trainer.save_every=0)"
        super().__init__(f"stopped by {name} after step {step}: {saved}; run the same command again to resume")

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_PREEMPTED


class StopSignals:
    """Records SIGTERM, SIGUSR1 and SIGINT while training (main thread only; elsewhere a no-op)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requested = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def finite_or_none(value: Any) -> Any:
    """A JSON-safe value: non-finite floats become None (JSON has no NaN or Infinity); containers recurse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value
