"""Constitutional AI's supervised stage (Bai et al. 2022, sec. 3): critique, revise, fine-tune.

    rlhf-engine cai --config configs/cai_tiny.yaml [key=value ...]

For every prompt of ``data.train_path`` (prompt rows, docs/data.md; chat or plain text, which becomes one
user turn) the policy (``model.hf_path``) answers; then, for ``cai.rounds`` rounds, a principle is drawn
from the constitution (``cai.constitution_path``), the reviser (``cai.reviser_path``, default the policy)
critiques the current answer under the principle's critique request and rewrites it under its revision
request (prompts in ``data/constitution.py``, rendered with each model's chat template, the
constitution's few-shot exchanges first). Each round's generations are batched over all prompts through
the engine's sampler (``rollout.*`` settings). The revisions are written to ``<out_dir>/revisions.jsonl``
as SFT rows:

    {"messages": [...prompt, {"role": "assistant", "content": <revision>}],
     "provenance": {"principle": "harmless", "round": 1, "critique": "...", "revised": "<answer critiqued>"}}

(``cai.keep: final`` keeps only the last round's). A prompt whose revision comes back empty, or whose
critique or revision prompt is longer than the model's context, yields no row for that round (counted in
the summary). Then, with ``cai.sft``, SFT of the policy on those rows runs as ``rlhf-engine sft`` would
(``<out_dir>/sft``, export ``<out_dir>/sft/hf``).
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import torch

from ..config import RunConfig
from ..data.chat import Message, pad_id, prompt_ids
from ..data.constitution import as_messages, critique_messages, load_constitution, revision_messages
from ..data.prompts import PromptRow, parse_prompt_row
from ..data.reader import read_rows
from ..models import load_hf_model, load_tokenizer
from ..rollout.sampling import GenerationProgress, generate
from .common import derive, single_process_run, write_summary
from .sft import run_sft


class ChatSampler:
    """One model and its tokenizer answering batches of conversations with the rollout settings."""

    def __init__(self, path: str, cfg: RunConfig, device) -> None:
        self.model = load_hf_model(path).to(device).eval()
        self.tok = load_tokenizer(path)
        self.cfg = cfg
        self.max_prompt = self.model.config.max_position_embeddings - cfg.rollout.max_new_tokens

    @torch.no_grad()
    def answer(self, conversations: list[list[Message] | None], generator: torch.Generator, what: str) -> list[str | None]:
        """The next assistant turn of each conversation (None in, or a prompt too long for the model: None out)."""
        ids = [prompt_ids(self.tok, c) if c is not None else None for c in conversations]
        todo = [i for i, x in enumerate(ids) if x is not None and len(x) <= self.max_prompt]
        out: list[str | None] = [None] * len(conversations)
        if not todo:
            return out
        r = self.cfg.rollout
        with GenerationProgress(f"{what}: {len(todo)} conversations"):
            gen = generate(self.model, [ids[i] for i in todo], max_new_tokens=r.max_new_tokens,
                           stop_ids=[self.tok.eos_token_id], pad_id=pad_id(self.tok), temperature=r.temperature or 1.0,
                           top_k=r.top_k, top_p=r.top_p, generator=generator, fuse=r.fuse_projections,
                           decode_mode=r.decode_mode)
        for i, resp in zip(todo, gen.responses):
            out[i] = self.tok.decode(resp, skip_special_tokens=True).strip()
        return out


def load_cai_prompts(cfg: RunConfig) -> list[PromptRow]:
    if cfg.data.train_path is None:
        raise ValueError("cai reads its prompts from data.train_path (prompt rows, docs/data.md)")
    rows = read_rows(cfg.data.train_path, parse_prompt_row)
    return rows[: cfg.cai.max_prompts] if cfg.cai.max_prompts is not None else rows


def critique_and_revise(cfg: RunConfig, rows: list[PromptRow], device) -> tuple[list[dict], dict[str, int]]:
    """The critique-revision loop over ``rows``: (SFT rows with provenance, counts)."""
    c = cfg.cai
    if c.constitution_path is None:
        raise ValueError("cai needs cai.constitution_path (a YAML constitution, data/constitution.py)")
    if cfg.model.hf_path is None:
        raise ValueError("cai starts from a policy checkpoint: set model.hf_path (and model.architecture: null)")
    constitution = load_constitution(c.constitution_path)
    constitution.require("critique", "revision", use="the critique-revision loop")
    policy = ChatSampler(cfg.model.hf_path, cfg, device)
    reviser = policy if c.reviser_path in (None, cfg.model.hf_path) else ChatSampler(c.reviser_path, cfg, device)
    gen = torch.Generator(device=device).manual_seed(cfg.trainer.seed)
    rng = random.Random(cfg.trainer.seed)
    counts = {"prompts": len(rows), "rows": 0, "empty_revisions": 0, "too_long": 0}
    current = policy.answer([as_messages(r.prompt) for r in rows], gen, "cai: initial answers")
    per_round: list[list[dict | None]] = []
    for rnd in range(1, c.rounds + 1):
        principles = [rng.choice(constitution.principles) for _ in rows]
        asks = [critique_messages(r.prompt, y, p, constitution) if y is not None else None
                for r, y, p in zip(rows, current, principles)]
        critiques = reviser.answer(asks, gen, f"cai round {rnd}: critiques")
        asks = [revision_messages(a, k, p) if a is not None and k is not None else None
                for a, k, p in zip(asks, critiques, principles)]
        revisions = reviser.answer(asks, gen, f"cai round {rnd}: revisions")
        out: list[dict | None] = []
        for i, (row, p) in enumerate(zip(rows, principles)):
            if current[i] is None or critiques[i] is None or revisions[i] is None:
                counts["too_long"] += current[i] is not None
                out.append(None)
                continue
            if not revisions[i]:
                counts["empty_revisions"] += 1
                out.append(None)  # the answer stays as it was for the next round
                continue
            prompt = [m.__dict__ for m in as_messages(row.prompt)]
            out.append({"messages": [*prompt, {"role": "assistant", "content": revisions[i]}],
                        "provenance": {"principle": p.name, "round": rnd, "critique": critiques[i],
                                       "revised": current[i]}})
            current[i] = revisions[i]
        per_round.append(out)
    keep = per_round if c.keep == "all" else per_round[-1:]
    rows_out = [r for i in range(len(rows)) for rnd in keep if (r := rnd[i]) is not None]
    counts["rows"] = len(rows_out)
    return rows_out, counts


def run_cai(cfg: RunConfig) -> dict[str, Any]:
    """Write the revisions, then (``cai.sft``) fine-tune the policy on them; returns the summary."""
    start = time.perf_counter()
    rt, out = single_process_run(cfg, "rlhf-engine cai generates in one process; run its SFT under torchrun "
                                      "with rlhf-engine sft data.train_path=<out_dir>/revisions.jsonl")
    rows, counts = critique_and_revise(cfg, load_cai_prompts(cfg), rt.device)
    if not rows:
        raise ValueError(f"the critique-revision loop produced no revision ({counts}); nothing to fine-tune on")
    path = out / "revisions.jsonl"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    summary: dict[str, Any] = {"revisions": str(path), **counts}
    if cfg.cai.sft:
        sft = run_sft(derive(cfg, "cai", algorithm={"name": "sft"},
                             data={"train_path": str(path), "eval_path": None},
                             trainer={"out_dir": str(out / "sft")}))
        summary.update({"export": sft["export"], "sft_eval_loss_initial": sft.get("eval_loss_initial"),
                        "sft_eval_loss_final": sft.get("eval_loss_final")})
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    write_summary(rt, out, summary)
    return summary
