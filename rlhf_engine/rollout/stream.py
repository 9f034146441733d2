"""The trainer's step source for online RL: collect a rollout, turn it into advantages, hand out steps.

    stream = ExperienceStream(maker, prompts, settings, cfg, rt, ptx=ptx_stream)
    Trainer(cfg, rt, roles, rl_objective(settings), stream, name="ppo", evaluate=...).fit()

Unlike the offline stages, where every rank builds the same global stream and takes its share, each
data-parallel rank collects its own share of every rollout: rollout r draws global prompts
[r P, (r + 1) P) from a seeded per-epoch shuffle, and rank i samples the i-th contiguous slice with a
generator seeded by (seed, r, i). Its N sequences are split into micro-batches of
``trainer.micro_batch_size`` rows, reshuffled for each of ``algorithm.rl.epochs`` passes; every
``trainer.grad_accum_steps`` micro-batches make one optimizer step. Before handing out a step, the
stream sums the micro-batches' counts (response tokens, sequences, pretraining tokens) over the
data-parallel ranks into the step's ``StepTotals``, which the objective normalises by.

Per rollout: scores are clipped and whitened (optional), the KL coefficient comes from the controller
(fixed or adaptive, updated with the rollout's KL afterwards), advantages and returns are computed by the
algorithm, and the rollout's metrics (reward and its parts, KL, lengths, KL coefficient) are reported
with the next step. With ``algorithm.rl.kl_stop``, a step whose approx KL(old || new) exceeds it ends
the rollout's epochs early (the decision uses the globally reduced step metrics, so all ranks agree).

One step off-policy (``algorithm.rl.off_policy_steps=1``): when rollout r is collected, rollout r + 1
starts decoding at once, with a copy of trunk + policy head at the current weights, in a background
thread or a sampler process (``rollout/sampler_process.py``), while rollout r's experience pass and
training run; r's generation was started the same way one rollout earlier (rollout 0 is sampled on the
spot).

Checkpoints: the position (rollout, micro-batch index, KL coefficient) goes into the progress record;
the rollout buffer itself (tensors) is saved per rank, so a resumed run continues inside a rollout
exactly where it stopped.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch

import torch.distributed as dist

from ..algorithms.advantages import KLController, masked_whiten
from ..algorithms.mismatch import mismatch_metrics
from ..algorithms.rl import RLSettings, advantages
from ..config import RunConfig
from ..data.prompts import PromptItem
from ..data.streams import Step, StepTotals, shuffled
from ..parallel.runtime import Runtime
from .experience import ExperienceBatch, ExperienceMaker, Rollout, Sampled
from .sampler_process import PendingSample, SamplerProcess


class ExperienceStream:
    """A ``trainer.StepSource``: each step is this rank's ``trainer.grad_accum_steps`` micro-batches."""

    def __init__(
        self,
        maker: ExperienceMaker,
        prompts: Sequence[PromptItem],
        settings: RLSettings,
        cfg: RunConfig,
        rt: Runtime,
        *,
        ptx: Any = None,  # a BatchStream of pretraining PackedBatches (every rank builds it; each takes its share)
    ) -> None:
        self.maker, self.prompts, self.s, self.cfg, self.rt, self.ptx = maker, list(prompts), settings, cfg, rt, ptx
        c, t = settings.cfg, cfg.trainer
        dp = rt.dims.dp
        if c.prompts_per_rollout % dp:
            raise ValueError(f"algorithm.rl.prompts_per_rollout={c.prompts_per_rollout} must be divisible by the "
                             f"data-parallel degree {dp}")
        local = c.prompts_per_rollout // dp * c.group
        if local % t.micro_batch_size or (local // t.micro_batch_size) % t.grad_accum_steps:
            raise ValueError(f"a rollout gives each rank {local} sequences (prompts_per_rollout / dp * group); it must "
                             f"split into whole steps of grad_accum_steps={t.grad_accum_steps} x "
                             f"micro_batch_size={t.micro_batch_size}")
        if len(self.prompts) < c.prompts_per_rollout:
            raise ValueError(f"{len(self.prompts)} training prompts < algorithm.rl.prompts_per_rollout={c.prompts_per_rollout}")
        self.kl = KLController(c.kl_coef, c.target_kl, c.kl_horizon)
        # off-policy: (rollout index, its generation: waiting in the thread or process sampler, or done)
        self.next: tuple[int, Future | PendingSample | Sampled] | None = None
        own_process = c.off_policy_steps and c.off_policy_sampler == "process"
        self.executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
                         if c.off_policy_steps and not own_process else None)
        self.sampler = SamplerProcess(c.off_policy_sampler_threads) if own_process else None
        self.rollout_index = 0  # rollouts collected so far
        self.index = 0  # next micro-batch of the current rollout's plan
        self.buffer: Rollout | None = None
        self.plans: list[torch.Tensor] = []
        self.pending: dict[str, float] = {}

    # ------------------------------------------------------------------------------------ rollouts

    def rollout_prompts(self, r: int) -> list[PromptItem]:
        """This rank's prompts of rollout r (module docstring)."""
        P, n = self.s.cfg.prompts_per_rollout, len(self.prompts)
        dp, rank = self.rt.dims.dp, self.rt.dp_rank
        start = r * P + rank * (P // dp)
        out = []
        for g in range(start, start + P // dp):
            epoch, i = divmod(g, n)
            out.append(self.prompts[shuffled(n, self.cfg.trainer.seed, epoch)[i]])
        return out

    def _seed(self, r: int) -> int:
        return (self.cfg.trainer.seed * 1_000_003 + r) * 1009 + self.rt.dp_rank

    def _generator(self, r: int) -> torch.Generator:
        return torch.Generator(device=self.rt.device).manual_seed(self._seed(r))

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a 1-D tensor over data-parallel ranks."""
        if self.rt.mesh is None or self.rt.dims.dp == 1:
            return x
        keys = [str(i) for i in range(x.numel())]
        summed = self.rt.sum_over_dp(dict(zip(keys, x.tolist())))
        return torch.tensor([summed[k] for k in keys], dtype=x.dtype, device=x.device)

    def collect(self) -> None:
        c = self.s.cfg
        r = self.rollout_index
        if not c.off_policy_steps:
            rollout = self.maker(self.rollout_prompts(r), self._generator(r))
        else:  # one step off-policy: rollout r was sampled while the trainer trained on r - 1
            waited = time.perf_counter()
            if self.next is not None and self.next[0] == r:
                sampled = self.next[1] if isinstance(self.next[1], Sampled) else self.next[1].result()
            else:  # the first rollout (or after a resume without a saved generation): sampled now
                sampled = self.maker.sample(self.rollout_prompts(r), self._generator(r))
            waited = time.perf_counter() - waited
            # rollout r + 1 starts decoding now, with the weights rollout r is scored and trained at, so that
            # it overlaps rollout r's experience pass as well as its training
            prompts, decoder = self.rollout_prompts(r + 1), self.maker.snapshot()
            if self.sampler is not None:
                items, kwargs = self.maker.decode_request(prompts)
                upcoming = self.sampler.submit(decoder, items, kwargs, self._seed(r + 1))
            else:
                upcoming = self.executor.submit(self.maker.sample, prompts, self._generator(r + 1), decoder=decoder)
            self.next = (r + 1, upcoming)
            rollout = self.maker.score(sampled)  # the experience pass at the current weights
            self.maker.timings["generation_wait_s"] = waited
        raw = rollout.scores.clone()
        scores = raw
        if c.reward_clip is not None:
            scores = scores.clamp(-c.reward_clip, c.reward_clip)
        if c.whiten_rewards:
            scores = masked_whiten(scores, torch.ones_like(scores, dtype=torch.bool), reduce=self._reduce)
        beta = self.kl.value
        adv, ret = advantages(self.s, scores, rollout.kl, rollout.mask, rollout.values, beta, self._reduce)
        rollout.advantages, rollout.returns = adv, ret
        # rollout metrics, global means over sequences
        N = rollout.num_sequences
        seq_kl = rollout.seq_kl()
        lengths = rollout.response_lengths().float()
        sums = {"reward": raw.sum(), "kl": seq_kl.sum(), "response_length": lengths.sum(),
                "kl_estimate": (rollout.kl.sum(dim=1)).sum(),
                **{f"reward_{k}": v.float().sum() for k, v in rollout.parts.items()}}
        keys = sorted(sums)
        totals = self._reduce(torch.stack([torch.tensor(float(N))] + [sums[k].float().cpu() for k in keys]).double())
        n_global = float(totals[0])
        means = {k: float(v) / max(n_global, 1.0) for k, v in zip(keys, totals[1:].tolist())}
        self.kl.update(means["kl"], int(n_global))
        if rollout.mismatch is not None:  # sampler vs trainer log-probs (algorithms/mismatch.py), over every rank
            mm = self.rt.sum_over_dp(rollout.mismatch)
            means.update(mismatch_metrics(mm, self.rt.max_over_ranks(rollout.mismatch["max"])))
        self.pending = {**{f"rollout/{k}": v for k, v in means.items()}, "rollout/kl_coef": beta,
                        "rollout/index": float(r), **{f"rollout/{k}": round(v, 4) for k, v in self.maker.timings.items()
                                                      if k != "generation_copy_s" or self.maker.generation_model}}
        self.buffer = rollout
        self.plans = self._plan(r, N)
        self.index = 0
        self.rollout_index = r + 1

    def _plan(self, r: int, n: int) -> list[torch.Tensor]:
        """Micro-batch row indices for every epoch over the rollout's n sequences."""
        mbs = self.cfg.trainer.micro_batch_size
        plans = []
        for epoch in range(self.s.cfg.epochs):
            g = torch.Generator().manual_seed((self.cfg.trainer.seed * 7919 + r) * 31 + epoch)
            order = torch.randperm(n, generator=g)
            plans += [order[i : i + mbs] for i in range(0, n, mbs)]
        return plans

    # ------------------------------------------------------------------------------------ the trainer's side

    def next_step(self) -> Step[ExperienceBatch]:
        """This rank's next ``trainer.grad_accum_steps`` micro-batches, with the step's global totals."""
        n = self.cfg.trainer.grad_accum_steps
        if self.buffer is None or self.index >= len(self.plans):
            self.collect()
        out = [ExperienceBatch.from_rollout(self.buffer, self.plans[self.index + i], self.kl.value) for i in range(n)]
        self.index += n
        if self.ptx is not None:
            dp, rank = self.rt.dims.dp, self.rt.dp_rank
            share = self.ptx.take(n * dp)[rank::dp]
            for b, p in zip(out, share):
                b.ptx = p
        local = StepTotals.of(out).counts
        keys = sorted(local)
        summed = self._reduce(torch.tensor([float(local[k]) for k in keys], dtype=torch.float64)).tolist()
        return Step(out, StepTotals(dict(zip(keys, summed))))

    def after_step(self, record: dict[str, float]) -> dict[str, float]:
        """Called by the trainer with the step's global metrics; returns the rollout metrics to log once."""
        stop = self.s.cfg.kl_stop
        if stop is not None and record.get("approx_kl", 0.0) > stop and self.index < len(self.plans):
            self.pending["rollout/kl_stopped_at"] = float(self.index)
            self.index = len(self.plans)  # the rest of this rollout's epochs is skipped
        out, self.pending = self.pending, {}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rollout": self.rollout_index, "index": self.index, "kl": self.kl.state_dict(),
                "ptx": self.ptx.state_dict() if self.ptx is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollout_index, self.index = int(state["rollout"]), int(state["index"])
        self.kl.load_state_dict(state["kl"])
        if self.ptx is not None and state.get("ptx") is not None:
            self.ptx.load_state_dict(state["ptx"])
        self.buffer, self.plans = None, []

    def rank_state(self) -> dict[str, Any] | None:
        """This rank's rollout buffer (tensors) and, off-policy, the next rollout's generation (waited for:
        it was sampled by weights a resumed run no longer has), saved beside the checkpoint."""
        if self.buffer is None:
            return None
        state = {"buffer": {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in self.buffer.state().items()},
                 "plans": self.plans}
        if self.next is not None:
            index, sampled = self.next
            state["next"] = (index, sampled if isinstance(sampled, Sampled) else sampled.result())
        return state

    def close(self) -> None:
        """Off-policy: wait for the background sampler and stop its thread or process, before the process
        group goes. (A generation still queued is dropped; one already decoding finishes: it cannot be
        interrupted.)"""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        if self.sampler is not None:
            self.sampler.close()

    def load_rank_state(self, state: dict[str, Any] | None) -> None:
        if state is None:
            self.index = 0  # no buffer saved: the next step collects a fresh rollout
            self.plans = []
            return
        device = self.rt.device
        b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state["buffer"].items()}
        self.buffer = Rollout(**b)
        self.plans = list(state["plans"])
        self.next = state.get("next")


def make_all_done(rt: Runtime) -> Callable[[bool], bool] | None:
    """Lockstep decoding across data-parallel ranks under FSDP: done when every rank is done."""
    if rt.mesh is None or rt.dims.dp == 1:
        return None

    def all_done(mine: bool) -> bool:
        flag = torch.tensor([0.0 if mine else 1.0], device=rt.device)
        dist.all_reduce(flag)
        return float(flag) == 0.0

    return all_done
