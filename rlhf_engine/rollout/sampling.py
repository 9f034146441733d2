"""Batched autoregressive sampling with a KV cache and left-padded prompts.

    gen = generate(model, prompts, max_new_tokens=64, stop_ids=[eos], pad_id=pad, temperature=1.0,
                   top_p=0.95, generator=torch.Generator().manual_seed(0), record_trunk=True)
    gen.sequences, gen.document_ids   # (B, P + T) prompt + response, ready for a scoring forward
    gen.logprobs                      # log-prob of each sampled token under the sampling distribution
    gen.trunk_states                  # (B, P + T, D) recorded while decoding (RoleModel with a trunk)

``model`` is a ``Transformer`` or a ``RoleModel`` (trunk + policy head, one KV cache over all layers).
Prompts of different lengths are left-padded into one (B, P) batch; padding is a document of its own
(id -1), so the model's causal-and-same-document mask hides it, and positions count only real tokens:
each row decodes exactly as it would alone. A row finishes at its first stop token or stop string; the
batch stops when every row has, or after ``max_new_tokens``. Finished rows are fed padding (document -1)
that no real token can see.

Progress: generations made inside ``with GenerationProgress("rankings: 4 samples per prompt"):`` report
to it after every decode step (a tqdm bar on a terminal, else a line every few seconds with the token,
the finished rows and an upper-bound ETA); outside one, ``generate`` reports nothing.

Under tensor parallelism each rank computes logits for its vocabulary shard and one all-gather of the
(B, V) rows assembles them; every rank then samples the same token from the same seeded generator.
"""

from __future__ import annotations

import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, TextIO

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import RunConfig
from ..data.chat import Message, pad_id, prompt_ids
from ..data.packing import PAD_DOCUMENT
from ..data.prompts import PromptRow, prompt_item
from ..models.decode import DecodeProgram
from ..models.hf import load_hf_model, load_tokenizer
from ..models.roles import Role, RoleModel
from ..models.transformer import DecoderLayer, KVCache, fused_projections, local_vocab_shard, softcap_logits


def sample_next(
    logits: torch.Tensor,  # (B, V)
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row (B,): greedy when temperature == 0, else softmax(logits / T) restricted to
    the top_k tokens and to the smallest set whose probability reaches top_p (nucleus, Holtzman 2020).

    Drawn by inverse-CDF sampling: one uniform u ~ U[0, 1) per row (from ``generator``), scaled by the
    kept mass m, picks the first token whose cumulative probability exceeds u m (tokens in vocabulary
    order, or in descending order for top-p, whose kept tokens are a prefix of that order). That is the
    renormalised distribution exactly, at one random number per row. ``torch.multinomial`` draws an
    exponential for every token of the vocabulary instead (its n = 1 path): 185 us against 36 us for a
    (16, 512) step on the 2-core CPU, where it was the largest part of sampling. Seeded streams
    therefore differ from ``torch.multinomial``'s (and from Hugging Face ``generate``'s)."""
    if temperature == 0:
        return logits.max(dim=-1).indices  # the first maximum, as argmax (which is 2x slower on a CPU)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)  # (B, V)
    order = None
    if top_p < 1.0:
        probs, order = _descending(probs)  # (B, V) each
    cdf = probs.cumsum(dim=-1)  # (B, V)
    if order is None:
        mass = cdf[:, -1:]  # (B, 1)
    else:  # keep a token while the mass before it is below top_p (the top token always stays)
        last = (cdf - probs < top_p).sum(dim=-1, keepdim=True) - 1  # (B, 1) the last kept index
        mass = cdf.gather(-1, last)  # (B, 1)
    drawn_on = generator.device if generator is not None else mass.device  # a CPU generator may drive GPU sampling
    u = torch.rand(mass.shape, generator=generator, device=drawn_on, dtype=mass.dtype).to(mass.device) * mass
    u = torch.minimum(u, torch.nextafter(mass, torch.zeros_like(mass)))  # u m may round up to m: keep u < m
    index = torch.searchsorted(cdf, u, right=True)  # (B, 1) the first cdf > u: a kept token of probability > 0
    return (index if order is None else order.gather(-1, index))[:, 0]


def _descending(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities in descending order and their token ids, (B, V) each. On a CPU through numpy's
    introsort (about 5x faster than torch's CPU sort at (16, 512), which made top-p sampling cost a
    quarter of a decode step); equal probabilities may come in either order, which only decides which
    of two tied tokens at the nucleus boundary stays."""
    if probs.device.type == "cpu":
        order = torch.from_numpy(np.argsort(-probs.detach().numpy(), axis=-1))  # (B, V)
        return probs.gather(-1, order), order
    return probs.sort(dim=-1, descending=True)


def full_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """(B, D) x LM head -> (B, V) fp32 logits (softcapped for Gemma 2); a vocabulary-sharded head is
    gathered across its group."""
    local, _, group = local_vocab_shard(weight)
    logits = softcap_logits(F.linear(hidden, local).float(), softcap)  # (B, V / tp)
    if group is None:
        return logits
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class GenerationProgress:
    """Progress of the generations inside ``with GenerationProgress(desc):`` (see the module docstring).
    Without a terminal it prints ``[generate <desc>: token t/T, r/B rows finished, ETA <= 0m05s]`` at most
    every ``every_s`` seconds and ``[generate <desc>: B rows, n tokens in 1.2 s]`` when a call ends. The
    ETA is an upper bound: it assumes every remaining step runs, though the batch stops when all rows do."""

    def __init__(self, desc: str, *, every_s: float = 5.0, stream: TextIO | None = None) -> None:
        self.desc, self.every_s, self.stream = desc, every_s, stream or sys.stderr
        self.bar = None
        self._token = None

    def __enter__(self) -> "GenerationProgress":
        self._token = _PROGRESS.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _PROGRESS.reset(self._token)
        self._close_bar()

    def start(self, max_new_tokens: int) -> None:
        self.started = self.last = time.perf_counter()
        if self.stream.isatty():
            from tqdm import tqdm  # lazy: only a terminal draws a bar

            self._close_bar()
            self.bar = tqdm(total=max_new_tokens, desc=f"generate {self.desc}", unit="tok", file=self.stream)

    def update(self, step: int, max_new_tokens: int, finished: int, rows: int) -> None:
        """Called by ``generate`` after decode step ``step`` (1-based)."""
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(finished=f"{finished}/{rows}")
        elif now - self.last >= self.every_s and step < max_new_tokens and finished < rows:
            eta = (now - self.started) / step * (max_new_tokens - step)
            print(f"[generate {self.desc}: token {step}/{max_new_tokens}, {finished}/{rows} rows finished, "
                  f"ETA <= {int(eta // 60)}m{int(eta % 60):02d}s]", file=self.stream, flush=True)
            self.last = now

    def end(self, rows: int, tokens: int) -> None:
        if self.bar is None:
            print(f"[generate {self.desc}: {rows} rows, {tokens} tokens in {time.perf_counter() - self.started:.1f} s]",
                  file=self.stream, flush=True)
        self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


_PROGRESS: ContextVar[GenerationProgress | None] = ContextVar("generation_progress", default=None)


@dataclass
class Generation:
    sequences: torch.Tensor  # (B, P + T) left-padded prompts followed by responses (pad after a row finishes)
    document_ids: torch.Tensor  # (B, P + T) 0 on real tokens, -1 on padding
    prompt_length: int  # P
    responses: list[list[int]]  # sampled tokens per row, the stop token included
    logprobs: list[list[float]]  # log p of each sampled token under softmax(logits / T) (T = 1 when greedy)
    finish_reasons: list[str]  # "stop" or "length"
    trunk_states: torch.Tensor | None  # (B, P + T, D) boundary states recorded while decoding, or None


def _local_kv_heads(model) -> int:
    layer = next(m for m in model.modules() if isinstance(m, DecoderLayer))
    weight = layer.self_attn.k_proj.weight
    rows = weight.shape[0]  # global rows for a DTensor; only tensor parallelism splits heads across ranks
    if hasattr(weight, "placements"):
        names = weight.device_mesh.mesh_dim_names or ()
        for i, placement in enumerate(weight.placements):
            if placement.is_shard(0) and i < len(names) and names[i] == "tp":
                rows //= weight.device_mesh.size(i)
    return rows // model.config.head_dim


def _decode_step(model, tokens, positions, document_ids, cache, record: bool):
    """One forward over the cache: (B, S) tokens -> ((B, S, D) final hidden states, (B, S, D) trunk states
    when ``record`` else None), through trunk + policy head of a ``RoleModel`` or a ``Transformer``."""
    if hasattr(model, "decode"):
        states: list[torch.Tensor] | None = [] if record else None
        hidden = model.decode(tokens, positions=positions, document_ids=document_ids, kv_cache=cache, record=states)
        return hidden, states[0] if states else None
    return model(tokens, positions=positions, document_ids=document_ids, kv_cache=cache), None


_COMPILED: dict[str, Callable] = {}


def _compiled_decode_step(device: torch.device) -> Callable:
    """``_decode_step`` through ``torch.compile``, one per device type (compiled graphs are cached by torch
    per input shapes, so a static cache of the same size reuses them across calls)."""
    if device.type not in _COMPILED:
        mode = "reduce-overhead" if device.type == "cuda" else None
        _COMPILED[device.type] = torch.compile(_decode_step, fullgraph=True, dynamic=False, mode=mode)
    return _COMPILED[device.type]


def _program_step(program: DecodeProgram, tokens, positions, document_ids, cache):
    return program.step(tokens, positions, document_ids, cache)


def _compiled_program_step() -> Callable:
    """The flat decode step (``DecodeProgram.step``) through inductor, for ``decode_mode=compiled`` on a CPU:
    each layer becomes its GEMMs, its attention and four fused loops (norm; rotary + cache write + mask;
    norm; SiLU-gate). A new program per generation reuses the compiled code (tensors are guarded by shape,
    not identity)."""
    if "program" not in _COMPILED:
        _COMPILED["program"] = torch.compile(_program_step, fullgraph=True, dynamic=False)
    return _COMPILED["program"]


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_strings: list[str] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    record_trunk: bool = False,
    all_done: Callable[[bool], bool] | None = None,
    sync_every: int | None = None,
    fuse: bool = True,
    decode_mode: str = "eager",
) -> Generation:
    """Sample continuations of ``prompts`` (see the module docstring); ``decode`` turns response tokens
    into text for ``stop_strings``. ``all_done(mine)``: whether every rank that steps in lockstep with
    this one (FSDP gathers each layer's weights collectively) has finished; by default, this rank.
    ``sync_every``: decode steps between the host's checks that every row has finished (None: 1 on a
    CPU, 8 on an accelerator, which then queues steps with no device sync per token); the result does
    not depend on it. ``fuse``: decode inside ``fused_projections`` (``rollout.fuse_projections``).
    ``decode_mode`` (``rollout.decode_mode``): ``eager``; ``static``, a static KV cache whose decode steps have fixed
    shapes (``KVCache(static=True)``, its length rounded up to a multiple of 64 so that few shapes occur);
    ``compiled``, those steps through ``torch.compile`` (on a CPU the flat step, ``models.decode``, through
    inductor; on CUDA the module step in mode ``reduce-overhead``: CUDA graphs, the cache at static addresses)."""
    if decode_mode not in ("eager", "static", "compiled"):
        raise ValueError(f"decode_mode must be eager, static or compiled, got {decode_mode!r}")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function (e.g. tokenizer.decode)")
    weight = model.output_weight
    device = weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    docs = torch.full((B, P), PAD_DOCUMENT, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.tensor(p)
        docs[b, P - len(p) :] = 0
    ids, docs = ids.to(device), docs.to(device)
    positions = (docs.eq(0).cumsum(dim=1) - 1).clamp(min=0)  # (B, P): 0 at each prompt's first token
    static = decode_mode != "eager"
    slots = P + max_new_tokens + 1
    cache = KVCache(model.config, B, -(-slots // 64) * 64 if static else slots, dtype=weight.dtype, device=device,
                    num_kv_heads=_local_kv_heads(model), static=static)
    record = [] if record_trunk and getattr(model, "trunk", None) is not None else None
    if decode_mode == "compiled" and device.type == "cuda":  # CUDA graphs replay at fixed addresses
        for t in (*cache.k, *cache.v, cache.document_ids, cache.filled):
            torch._dynamo.mark_static_address(t)

    def run(tokens, pos, doc, one_token: bool = False):
        if one_token and program is not None:
            step = _compiled_program_step() if decode_mode == "compiled" else _program_step
            hidden, states = step(program, tokens, pos, doc, cache)
        elif one_token and decode_mode == "compiled":
            hidden, states = _compiled_decode_step(device)(model, tokens, pos, doc, cache, record is not None)
        else:  # eager, also where training compiled the layers (parallel.compile_layers): shapes vary per call
            with torch.compiler.set_stance("force_eager"):
                hidden, states = _decode_step(model, tokens, pos, doc, cache, record is not None)
        if states is not None and record is not None:
            record.append(states)
        return hidden

    # RL roles decode with the trunk and the policy head only: the other heads need no fused copies
    decoding = [model.trunk, model.head(Role.POLICY)] if isinstance(model, RoleModel) else [model]
    decoding = decoding if fuse else []
    with fused_projections(*decoding):  # q/k/v and gate/up as one GEMM each while decoding
        # one-token steps through the flat decode step (equal to the modules; None where it cannot be)
        # (compiled on a CPU: that step through inductor; on CUDA the module step, captured as CUDA graphs)
        flat = fuse and (decode_mode != "compiled" or device.type == "cpu")
        # (positions stay below the cache's length, a multiple of 64 in static modes: the rotary tables then
        # have one of few shapes and a compiled step is reused across prompt lengths)
        program = DecodeProgram.build(model, cache.max_len) if flat else None
        softcap = model.config.final_logit_softcapping
        logits_of = program.logits if program is not None else lambda h: full_logits(h, weight, softcap)
        hidden = run(ids, positions, docs)[:, -1]  # (B, D)
        next_pos = positions[:, -1] + 1  # (B,)
        stop = torch.tensor(stop_ids, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        pad_tokens = torch.full((B,), pad_id, dtype=torch.long, device=device)
        real_docs, pad_docs = torch.zeros_like(pad_tokens), torch.full_like(pad_tokens, PAD_DOCUMENT)
        stopped = torch.zeros(B, dtype=torch.bool, device=device)
        tokens_out, logps_out, docs_out = [], [], []
        texts: list[list[int]] | None = [[] for _ in range(B)] if stop_strings else None
        progress = _PROGRESS.get()
        if progress is not None:
            progress.start(max_new_tokens)
        # The host learns whether every row has finished every `check` steps: each step on CPU, every 8 on
        # a GPU so that decoding queues work without a device sync per token (finished rows decode padding
        # meanwhile; those columns are cut off below).
        check = sync_every or (1 if device.type == "cpu" else 8)
        fed_last = False  # whether the last sampled token was fed (its trunk states recorded)
        for i in range(max_new_tokens):
            logits = logits_of(hidden)  # (B, V) fp32
            token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            scaled = logits / temperature if temperature not in (0.0, 1.0) else logits  # (x / 1 is x)
            logp = torch.log_softmax(scaled, dim=-1).gather(1, token[:, None])[:, 0]
            live = ~done
            token = torch.where(live, token, pad_tokens)
            tokens_out.append(token)
            logps_out.append(logp)
            docs_out.append(torch.where(live, real_docs, pad_docs))
            finished_now = live & torch.isin(token, stop) if stop_ids else torch.zeros_like(live)
            if texts is not None:  # stop strings need the text so far: the host reads every token
                for b in torch.nonzero(live)[:, 0].tolist():
                    texts[b].append(int(token[b]))
                for b in torch.nonzero(live & ~finished_now)[:, 0].tolist():
                    if any(s in decode(texts[b]) for s in stop_strings):
                        finished_now[b] = True
            stopped |= finished_now
            done |= finished_now
            fed_last = False
            if i == max_new_tokens - 1:  # the last tokens' outputs are never needed
                break
            if (i + 1) % check == 0 or texts is not None:
                finished = bool(done.all())
                if all_done is not None:
                    finished = all_done(finished)
                if progress is not None:
                    progress.update(i + 1, max_new_tokens, int(done.sum()), B)
                if finished:
                    break
            hidden = run(token[:, None], next_pos[:, None], docs_out[-1][:, None], one_token=True)[:, -1]
            next_pos = next_pos + live.long()
            fed_last = True
        if record is not None and not fed_last:  # one trunk step completes the states of the last tokens
            last = tokens_out[-1][:, None], next_pos[:, None], docs_out[-1][:, None]  # (B, 1) each
            if program is not None:  # the same arithmetic as the steps before it
                record.append(program.step(*last, cache, trunk_only=True)[1])
            else:
                record.append(model.trunk(last[0], positions=last[1], document_ids=last[2], kv_cache=cache))
    live_steps = torch.stack(docs_out, dim=1).eq(0)  # (B, T) a row is live for a prefix of the steps
    lengths = live_steps.sum(1).tolist()
    T = max(lengths)  # steps decoded after every row had finished are cut off
    sequences = torch.cat([ids, torch.stack(tokens_out, dim=1)[:, :T]], dim=1)
    document_ids = torch.cat([docs, torch.stack(docs_out, dim=1)[:, :T]], dim=1)
    new_tokens = sequences[:, P:].tolist()
    responses = [row[:n] for row, n in zip(new_tokens, lengths)]
    logps = torch.stack(logps_out, dim=1).tolist()
    reasons = ["stop" if s else "length" for s in stopped.tolist()]
    if progress is not None:
        progress.end(B, sum(lengths))
    return Generation(
        sequences=sequences,
        document_ids=document_ids,
        prompt_length=P,
        responses=responses,
        logprobs=[row[: len(r)] for row, r in zip(logps, responses)],
        finish_reasons=reasons,
        trunk_states=torch.cat(record, dim=1)[:, : P + T] if record is not None else None,
    )


# ---------------------------------------------------------------------------------------------- helpers


@torch.no_grad()
def sample_responses(model, tokenizer, conversations: list[list[Message]], cfg: RunConfig) -> list[dict[str, str]]:
    """Responses to the prompts of held-out conversations, sampled with the rollout settings."""
    if not conversations:
        return []
    prompts = []
    for conv in conversations:
        first_answer = next(i for i, msg in enumerate(conv) if msg.role == "assistant")
        prompts.append(conv[:first_answer])
    model.eval()
    r = cfg.rollout
    gen = generate(model, [prompt_ids(tokenizer, p) for p in prompts], max_new_tokens=r.max_new_tokens,
                   stop_ids=[tokenizer.eos_token_id], pad_id=pad_id(tokenizer), temperature=r.temperature,
                   top_k=r.top_k, top_p=r.top_p, generator=torch.Generator().manual_seed(cfg.trainer.seed),
                   fuse=r.fuse_projections, decode_mode=r.decode_mode)
    return [{"prompt": p[-1].content, "response": tokenizer.decode(o, skip_special_tokens=True).strip(),
             "reference": conv[len(p)].content} for p, o, conv in zip(prompts, gen.responses, conversations)]


@torch.no_grad()
def sample_from_policy(policy_path: str, rows: list[PromptRow], cfg: RunConfig, k: int, seed: int) -> list[list[str]]:
    """K responses per prompt from an exported policy (a Hugging Face checkpoint), with the rollout settings."""
    model, tok = load_hf_model(policy_path).eval(), load_tokenizer(policy_path)
    items = [prompt_item(tok, r, cfg.data.seq_len - cfg.rollout.max_new_tokens) for r in rows]
    r = cfg.rollout
    gen = generate(model, [p.ids for p in items for _ in range(k)], max_new_tokens=r.max_new_tokens,
                   stop_ids=[tok.eos_token_id], pad_id=pad_id(tok), temperature=r.temperature or 1.0, top_k=r.top_k,
                   top_p=r.top_p, generator=torch.Generator().manual_seed(seed), fuse=r.fuse_projections,
                   decode_mode=r.decode_mode)
    texts = [tok.decode(ids, skip_special_tokens=True).strip() for ids in gen.responses]
    return [texts[i * k : (i + 1) * k] for i in range(len(rows))]
