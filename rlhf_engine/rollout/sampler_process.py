"""One-step off-policy sampling in a child process (``algorithm.rl.off_policy_sampler=process``).

    sampler = SamplerProcess(threads=1)
    pending = sampler.submit(maker.snapshot(), items, kwargs, seed)   # returns at once
    ...                                                              # the trainer trains meanwhile
    sampled = pending.result()                                       # a rollout.experience.Sampled
    sampler.close()

The thread sampler (the default) decodes in the trainer's own process, where its small ops and the
trainer's step share one interpreter lock: on a small CPU machine the overlap then costs more than it
saves (benchmarks/bench_off_policy.py). A sampler process has its own interpreter and its own intra-op
threads (``algorithm.rl.off_policy_sampler_threads``), so decoding rollout t+1 really runs beside the
training on rollout t. Each rank of a multi-process run starts its own.

Weights. The first ``submit`` moves the decoder (trunk + policy head, ``ExperienceMaker.snapshot()``)
into shared memory and hands it to the child once; every later ``submit`` copies the trainer's current
weights into that shared copy in place. Writes happen only while the child is idle (one request at a
time: ``submit`` refuses a second before the first's ``result``), so a generation never sees weights
change under it.

Determinism. The child decodes with ``rollout.sampling.generate`` and a generator seeded as the
trainer's would be, so at equal intra-op thread counts the rollout equals the thread sampler's token for
token (tested). A child that dies or raises is reported by ``result`` with its exit code or traceback,
never waited on forever.

Signals. Ctrl-C, SIGTERM and SIGUSR1 reach every process of a launcher's group. The child is started
with them ignored, so a graceful stop (``faults``) can still collect the rollout it is decoding for the
checkpoint; the trainer then stops it. A child whose trainer died without stopping it exits by itself.
"""

from __future__ import annotations

import os
import queue
import resource
import signal
import threading
import time
import traceback
from typing import Any, Sequence

import torch
import torch.multiprocessing as mp
from torch import nn

from ..data.prompts import PromptItem
from .experience import Sampled
from .sampling import generate


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # those faults.StopSignals handles


def _serve(requests, results, threads: int, parent: int) -> None:
    """The child's loop: ("decoder", model) installs the shared decoder, ("sample", prompts, kwargs, seed)
    decodes, None stops. Ctrl-C, SIGTERM and SIGUSR1 reach a launcher's whole process group: the child ignores them,
    so that the trainer's graceful stop (``faults``) can still collect the pending rollout for its
    checkpoint, and then stops the child itself. A child whose trainer died without stopping it exits."""
    for signum in STOP_SIGNALS:  # already ignored since exec when started from the main thread
        signal.signal(signum, signal.SIG_IGN)
    torch.set_num_threads(threads)
    decoder = None
    while True:
        try:
            msg = requests.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # re-parented: the trainer is gone
                return
            continue
        if msg is None:
            return
        if msg[0] == "decoder":
            decoder = msg[1]
            continue
        _, prompts, kwargs, seed = msg
        try:
            start = time.perf_counter()
            device = next(decoder.parameters()).device
            with torch.no_grad():
                gen = generate(decoder, prompts, generator=torch.Generator(device=device).manual_seed(seed), **kwargs)
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
            results.put(("ok", gen, {"generation_s": time.perf_counter() - start, "sampler_peak_mem_mb": peak_mb}))
        except BaseException:  # reported to the trainer, which raises it
            results.put(("error", traceback.format_exc(), {}))


class PendingSample:
    """A submitted generation; ``result()`` waits for it and returns the ``Sampled`` (cached)."""

    def __init__(self, sampler: "SamplerProcess", items: list[PromptItem], record: bool, copy_s: float) -> None:
        self.sampler, self.items, self.record, self.copy_s = sampler, items, record, copy_s
        self._sampled = None

    def result(self):
        if self._sampled is None:
            status, payload, stats = self.sampler._receive()
            if status == "error":
                raise RuntimeError(f"the off-policy sampler process failed:\n{payload}")
            self._sampled = Sampled(self.items, payload, self.record, {"generation_copy_s": self.copy_s, **stats})
            self.sampler.pending = None
        return self._sampled


class SamplerProcess:
    """A child process that decodes one rollout at a time with a shared-memory copy of the decoder."""

    def __init__(self, threads: int = 1, *, poll_s: float = 1.0) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that holds threads and a process group
        self.requests, self.results = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=_serve, args=(self.requests, self.results, threads, os.getpid()), daemon=True,
                                   name="rlhf-engine-sampler")
        # Started with the stop signals ignored (a disposition exec keeps), so that the child never dies of
        # one, even while it is still importing; the parent's handlers are restored at once.
        main = threading.current_thread() is threading.main_thread()
        previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS} if main else {}
        try:
            self.process.start()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        # the child's threads come out of the trainer's share: oversubscribed cores slow both sides' GEMMs
        self.trainer_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, self.trainer_threads - threads))
        self.poll_s = poll_s
        self.decoder: nn.Module | None = None
        self.pending: PendingSample | None = None

    @torch.no_grad()
    def submit(self, decoder: nn.Module, items: Sequence[PromptItem], kwargs: dict[str, Any], seed: int) -> PendingSample:
        """Decode ``items`` with ``decoder``'s weights (copied now) and a generator seeded with ``seed``."""
        if self.pending is not None:
            raise RuntimeError("the sampler process decodes one rollout at a time: collect the pending one first")
        start = time.perf_counter()
        if self.decoder is None:
            self.decoder = decoder.share_memory()
            self.requests.put(("decoder", self.decoder))
        else:  # the child is idle: refresh its weights in place
            mine = self.decoder.state_dict()
            for name, tensor in decoder.state_dict().items():
                mine[name].copy_(tensor)
        self.requests.put(("sample", [p.ids for p in items], kwargs, seed))
        self.pending = PendingSample(self, list(items), bool(kwargs.get("record_trunk")), time.perf_counter() - start)
        return self.pending

    def _receive(self) -> tuple[str, Any, dict[str, float]]:
        while True:
            try:
                return self.results.get(timeout=self.poll_s)
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError(f"the off-policy sampler process exited with code {self.process.exitcode} "
                                       "while decoding a rollout") from None

    def close(self) -> None:
        """Stop the child (a generation in progress is finished first; a dead child is reaped)."""
        if self.pending is not None and self.process.is_alive():
            try:  # its result must leave the pipe before the child can exit
                self.pending.result()
            except RuntimeError:
                pass
        if self.process.is_alive():
            self.requests.put(None)
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join()
        self.requests.close()
        self.results.close()
        torch.set_num_threads(self.trainer_threads)
