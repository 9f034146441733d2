"""Experience making: sample responses, score them, and pass each sequence once through the roles.

    maker = ExperienceMaker(roles, tokenizer, reward, settings, cfg.rollout, reward_head_bias=b)
    rollout = maker(prompts, generator)          # this rank's prompts, each sampled `group` times

One rollout is: generation with the policy (trunk + policy head, one KV cache; the trunk's boundary
states are recorded while decoding), then a single no-grad forward over the recorded trunk states that
runs the policy (old log-probs), reference (log-probs and exact KL), critic (values) and, when the
learned reward model shares the trunk, the reward head; then the combined reward (learned score, rules,
length, format, programmatic functions) per sequence.

Token tensors are (N, S) over prompt + response, left-padded prompts as ``generate`` returns them. The
target at position t is the token at t + 1 when that token is a sampled response token, so every
per-token quantity (log-probs, KL, values, advantages) sits at the position that predicts the token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Sequence

import torch
from rlhf_kernels import kl_estimate
from torch.distributed.tensor import DTensor

from ..algorithms.rl import RLSettings
from ..config import RolloutConfig
from ..data.packing import IGNORE_INDEX, PAD_DOCUMENT, PackedBatch
from ..data.prompts import PromptItem, template_suffix
from ..algorithms.mismatch import correction_weights, mismatch_sums
from ..models.roles import Role, RoleModel
from ..rewards import CombinedReward, Sample
from .sampling import Generation, generate


@dataclass
class Rollout:
    """One rank's share of a rollout; N = prompts * group sequences of S tokens."""

    input_ids: torch.Tensor  # (N, S)
    document_ids: torch.Tensor  # (N, S) 0 on real tokens, -1 on padding
    targets: torch.Tensor  # (N, S) next response token, IGNORE_INDEX elsewhere
    mask: torch.Tensor  # (N, S) bool, targets != IGNORE_INDEX
    old_logp: torch.Tensor  # (N, S) policy log-probs at collection (temperature applied); sampling log-probs when on-policy
    on_policy: bool  # one optimizer step per rollout: the loss takes the current log-probs as the old ones
    ref_logp: torch.Tensor  # (N, S)
    kl: torch.Tensor  # (N, S) per-token KL estimate (the configured estimator)
    values: torch.Tensor | None  # (N, S) critic values at collection
    scores: torch.Tensor  # (N,) the combined reward of each sequence
    parts: dict[str, torch.Tensor]  # reward components, (N,) each, unweighted
    trunk_states: torch.Tensor | None  # (N, S, D) boundary states, kept for the epochs
    prompts: list[str]
    responses: list[str]
    advantages: torch.Tensor | None = None  # (N, T), filled by the stream
    returns: torch.Tensor | None = None
    is_weight: torch.Tensor | None = None  # (N, S) mismatch correction weights (algorithms/mismatch.py), or None
    keep: torch.Tensor | None = None  # (N, S) bool: tokens masked IS keeps (None: all)
    mismatch: dict[str, float] | None = None  # this rank's mismatch_sums, when measured

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    def response_lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    def seq_kl(self) -> torch.Tensor:
        """(N,) summed log-ratio log pi - log ref over each response (the k1 estimate of its KL)."""
        return ((self.old_logp - self.ref_logp) * self.mask).sum(dim=1)

    def state(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Sampled:
    """A rollout's generation before its experience pass (``ExperienceMaker.sample``)."""

    items: list[PromptItem]  # one per sequence (group members consecutive)
    gen: Generation
    record: bool  # whether gen.trunk_states were recorded for the experience pass
    timings: dict[str, float]


@dataclass
class ExperienceBatch:
    """A micro-batch of a rollout's rows (and, with PPO-ptx, its share of pretraining rows)."""

    input_ids: torch.Tensor
    document_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    advantages: torch.Tensor
    old_values: torch.Tensor | None
    returns: torch.Tensor | None
    trunk_states: torch.Tensor | None
    kl_coef: float
    on_policy: bool = False
    is_weight: torch.Tensor | None = None  # (n, T) multiplies the advantages (tis, mis)
    ptx: PackedBatch | None = None

    def counts(self) -> dict[str, int]:
        """``tokens``: real tokens (throughput); ``sequences`` with a response token; ``response_tokens``;
        ``ptx_tokens``: label tokens of the pretraining rows."""
        return {"tokens": int((self.document_ids != PAD_DOCUMENT).sum()),
                "sequences": int(self.mask.any(dim=1).sum()), "response_tokens": int(self.mask.sum()),
                "ptx_tokens": self.ptx.counts()["targets"] if self.ptx is not None else 0}

    def to(self, device) -> "ExperienceBatch":
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved, ptx=self.ptx.to(device) if self.ptx is not None else None)

    @classmethod
    def from_rollout(cls, r: Rollout, rows: torch.Tensor, kl_coef: float) -> "ExperienceBatch":
        pick = lambda t: t[rows] if t is not None else None  # noqa: E731
        mask = r.mask if r.keep is None else r.mask & r.keep  # masked IS: rejected tokens leave the loss and its count
        return cls(pick(r.input_ids), pick(r.document_ids), pick(r.targets), pick(mask), pick(r.old_logp),
                   pick(r.ref_logp), pick(r.advantages), pick(r.values), pick(r.returns), pick(r.trunk_states), kl_coef,
                   r.on_policy, pick(r.is_weight))


def response_targets(sequences: torch.Tensor, document_ids: torch.Tensor, prompt_length: int,
                     lengths: list[int] | None = None) -> torch.Tensor:
    """(N, S) targets: position t targets token t + 1 when it is a sampled response token (not padding,
    and within the row's ``lengths`` sampled tokens when given: tokens appended after it are not targets)."""
    targets = torch.full_like(sequences, IGNORE_INDEX)
    nxt, live = sequences[:, 1:], document_ids[:, 1:] != PAD_DOCUMENT
    idx = torch.arange(1, sequences.shape[1], device=sequences.device)  # (S - 1,) position of the target token
    response = (idx >= prompt_length).expand_as(nxt)
    if lengths is not None:
        response = response & (idx < prompt_length + torch.tensor(lengths, device=sequences.device)[:, None])
    targets[:, :-1] = torch.where(live & response, nxt, IGNORE_INDEX)
    return targets


class ExperienceMaker:
    """Generation, scoring and the experience forward (module docstring)."""

    def __init__(
        self,
        model: RoleModel,
        tokenizer,
        reward: CombinedReward,
        settings: RLSettings,
        rollout: RolloutConfig,
        *,
        pad_id: int,
        reward_head_bias: float | None = None,
        all_done: Callable[[bool], bool] | None = None,
        on_policy: bool = False,
        generation_model: Callable[[], Any] | None = None,
    ) -> None:
        """``on_policy``: each rollout feeds exactly one optimizer step and the KL sits in the loss, so the
        experience pass skips the policy head: the loss's old log-probs are its own (detached) log-probs,
        which gives the same ratio (1) and gradient; the rollout's KL metrics use the sampling log-probs.
        ``generation_model``: builds the model to decode with when it is not ``model`` (under pipeline
        parallelism, the policy gathered whole on every rank: ``rollout.assembly.generation_copy``);
        the experience forward then runs through the pipeline (``PipelinedModel.infer``)."""
        self.model, self.tokenizer, self.reward, self.s, self.rollout = model, tokenizer, reward, settings, rollout
        self.pad_id = pad_id
        self.reward_head_bias = reward_head_bias  # None: no reward head (the reward is CombinedReward's)
        self.all_done = all_done
        self.on_policy = on_policy and settings.kl_in == "loss" and not settings.critic
        self.suffix = template_suffix(tokenizer)
        self.generation_model = generation_model
        self.timings: dict[str, float] = {}  # seconds of the last rollout's phases (this rank)

    @property
    def trainer_logprobs(self) -> bool:
        """Whether the experience pass computes the policy's log-probs: always with several steps per
        rollout (they are the old log-probs), and for mis with one (its rejected tokens leave the step's
        token count, which is fixed before the training forward). With one step per rollout otherwise,
        the training forward runs at the sampling weights and the loss measures the mismatch and makes
        the tis weights from it (``algorithms/rl.py``), saving a policy forward per rollout."""
        c = self.s.cfg
        return not self.on_policy or c.is_correction == "mis"

    @property
    def roles(self) -> set[Role]:
        roles = {Role.POLICY, Role.REFERENCE} if self.trainer_logprobs else {Role.REFERENCE}
        if self.s.critic:
            roles.add(Role.CRITIC)
        if self.reward_head_bias is not None:
            roles.add(Role.REWARD)
        return roles

    def __call__(self, prompts: Sequence[PromptItem], generator: torch.Generator, *, group: int | None = None) -> Rollout:
        return self.score(self.sample(prompts, generator, group=group))

    def decode_request(self, prompts: Sequence[PromptItem], group: int | None = None) -> tuple[list[PromptItem], dict[str, Any]]:
        """The rollout's items (each prompt ``group`` times, members consecutive) and ``generate``'s keyword
        arguments for them, but the generator and the lockstep (the same for every decoder: in this
        process, a background thread, or a sampler process)."""
        r, s = self.rollout, self.s
        G = s.cfg.group if group is None else group
        items = [p for p in prompts for _ in range(G)]
        suffix = self.suffix if any(p.chat for p in items) else []
        # appended end-of-turn tokens have no recorded trunk states: then the trunk runs once more
        record = s.cfg.cache_trunk and self.model.trunk is not None and not suffix
        return items, dict(max_new_tokens=r.max_new_tokens, stop_ids=[self.tokenizer.eos_token_id], pad_id=self.pad_id,
                           temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, record_trunk=record,
                           fuse=r.fuse_projections, decode_mode=r.decode_mode)

    @torch.no_grad()
    def sample(self, prompts: Sequence[PromptItem], generator: torch.Generator, *, group: int | None = None,
               decoder: Any = None) -> Sampled:
        """Generation only. ``decoder``: a model to decode with instead (``snapshot()``'s whole copy, from a
        background thread while the trainer updates ``model``, which this then never touches; each rank
        decodes it alone, so without the lockstep across data-parallel ranks)."""
        model = self.model
        items, kwargs = self.decode_request(prompts, group)
        t0 = time.perf_counter()
        all_done = self.all_done if decoder is None else None
        if decoder is None:
            model.eval()
            decoder = self.generation_model() if self.generation_model is not None else model
        t1 = time.perf_counter()
        if decoder is model:
            _unshard(model)
        gen = generate(decoder, [p.ids for p in items], generator=generator, all_done=all_done, **kwargs)
        if decoder is model:
            _reshard(model)
        del decoder  # a generation copy is freed before the experience pass
        return Sampled(items, gen, kwargs["record_trunk"],
                       {"generation_copy_s": t1 - t0, "generation_s": time.perf_counter() - t1})

    @torch.no_grad()
    def snapshot(self) -> RoleModel:
        """Trunk + policy head as they are now, copied whole onto this rank: what samples the next rollout
        while the trainer updates this one (``algorithm.rl.off_policy_steps=1``). Under tensor, FSDP or
        pipeline parallelism the copy is gathered unsharded (a collective every rank makes at the same
        point), so decoding it in a background thread makes no collective that could interleave with the
        trainer's: each rank samples its share of the next rollout alone. It costs one whole copy of
        trunk + policy head per rank while it decodes."""
        model = self.model
        keep = lambda name: name.startswith(("trunk.", "heads.policy."))  # noqa: E731
        if hasattr(model, "gather_state"):  # a PipelinedModel: every stage's tensors, unsharded (on the CPU)
            state = model.gather_state(keep)
        else:
            state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                     for k, v in model.state_dict().items() if keep(k)}
        device = next(iter(model.parameters())).device
        with torch.device("meta"):
            copy = RoleModel(model.config, model.trunk_layers, roles=(Role.POLICY,), lora=model.lora)
        copy.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
        return copy.requires_grad_(False).eval()

    @torch.no_grad()
    def score(self, sampled: Sampled) -> Rollout:
        """The experience pass over a generation, with the model as it is now, and the rewards."""
        model, s = self.model, self.s
        model.eval()
        items, gen, record = sampled.items, sampled.gen, sampled.record
        t2 = time.perf_counter()
        suffix = self.suffix if any(p.chat for p in items) else []
        seqs, docs = gen.sequences, gen.document_ids
        ends = [suffix if p.chat and why == "stop" else [] for p, why in zip(items, gen.finish_reasons)]
        if suffix:
            seqs, docs = append_after_responses(seqs, docs, gen, ends, self.pad_id)
        targets = response_targets(seqs, docs, gen.prompt_length, [len(r) for r in gen.responses])
        forward = model.infer if hasattr(model, "infer") else model  # a PipelinedModel runs it through its stages
        out = forward(seqs, document_ids=docs, targets=targets, trunk_states=gen.trunk_states, roles=self.roles,
                      temperature=s.temperature)
        mask = targets.ne(IGNORE_INDEX)
        self.timings = {**sampled.timings, "experience_s": time.perf_counter() - t2}
        behaviour = sampled_logprobs(gen, targets.shape).to(mask.device) * mask  # the sampler's log-probs
        trainer = out.logp.float() * mask if self.trainer_logprobs else None
        logp, ref_logp = (behaviour if self.on_policy else trainer), out.ref_logp.float() * mask
        c = s.cfg
        mismatch = mismatch_sums(trainer, behaviour, mask) if trainer is not None and c.log_mismatch else None
        is_weight, keep = (correction_weights(trainer, behaviour, mask, c.is_correction, c.is_threshold)
                           if trainer is not None else (None, None))
        if s.kl_estimator == "exact" and not self.on_policy:
            kl = out.kl.float() * mask
        else:
            kl = kl_estimate(logp, ref_logp, "k3" if s.kl_estimator == "exact" else s.kl_estimator,
                             clamp=s.cfg.kl_clamp, log_ratio_clamp=s.cfg.log_ratio_clamp) * mask
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in gen.responses]
        samples = [Sample(p.ids, list(resp) + end, p.text, text, p.answer)  # ends as the RM's training rows did
                   for p, resp, end, text in zip(items, gen.responses, ends, texts)]
        learned = None
        if self.reward_head_bias is not None:  # the reward head on the shared trunk, read as the RM reads
            real = docs != PAD_DOCUMENT  # (N, S)
            if self.reward.head_pooling == "mean":  # over the response and its end-of-turn suffix (the RM's rows)
                response = real & (torch.arange(docs.shape[1], device=docs.device) >= gen.prompt_length)[None]
                pooled = (out.rewards.float() * response).sum(1) / response.sum(1).clamp(min=1)  # (N,)
            else:
                last = real.long().cumsum(1).argmax(1)  # (N,) index of the last real token
                pooled = out.rewards.float().gather(1, last[:, None])[:, 0]
            learned = pooled.cpu() + self.reward_head_bias
        breakdown = self.reward(samples, preference_scores=learned)
        values = out.values.float() * mask if out.values is not None else None
        return Rollout(seqs, docs, targets, mask, logp, self.on_policy, ref_logp, kl, values, breakdown.total.to(seqs.device),
                       breakdown.parts, gen.trunk_states if record else None, [p.text for p in items], texts,
                       is_weight=is_weight, keep=keep, mismatch=mismatch)


def append_after_responses(seqs, docs, gen, ends: list[list[int]], pad_id: int):
    """(N, S + L) sequences and document ids with each row's ``ends`` tokens right after its response
    (as real tokens of the document, never targets: ``response_targets`` stops at the response)."""
    L = max(len(e) for e in ends)
    N = seqs.shape[0]
    seqs = torch.cat([seqs, seqs.new_full((N, L), pad_id)], dim=1)
    docs = torch.cat([docs, docs.new_full((N, L), PAD_DOCUMENT)], dim=1)
    for b, end in enumerate(ends):
        if end:
            at = gen.prompt_length + len(gen.responses[b])
            seqs[b, at : at + len(end)] = torch.tensor(end, device=seqs.device)
            docs[b, at : at + len(end)] = 0
    return seqs, docs


def sampled_logprobs(gen, shape) -> torch.Tensor:
    """(N, S) the sampling log-probs of each response token, at the position that predicts it."""
    out = torch.zeros(shape, dtype=torch.float32)
    for b, row in enumerate(gen.logprobs):
        out[b, gen.prompt_length - 1 : gen.prompt_length - 1 + len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def _unshard(model) -> None:
    """FSDP2 gathers a layer's weights around its forward; decoding calls trunk and head layers directly,
    so the root's own parameters (embedding, final norms, LM heads) are gathered for the whole generation."""
    if hasattr(model, "unshard") and hasattr(model, "reshard"):
        state = model._get_fsdp_state()
        state._lazy_init()  # as the root: otherwise the first layer decoding calls would initialise as one
        model.unshard()


def _reshard(model) -> None:
    if hasattr(model, "unshard") and hasattr(model, "reshard"):
        model.reshard()
