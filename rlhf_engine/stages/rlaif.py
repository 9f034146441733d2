"""RLAIF's labelling step: an AI labeler, guided by a constitution, ranks responses with soft labels.

    rlhf-engine rlaif --config configs/rlaif_tiny.yaml [key=value ...]
    rlhf-engine rm --config configs/rm_tiny.yaml data.train_path=runs/rlaif_tiny/rankings.jsonl

Rows of ``data.train_path`` are either responses to compare, ``{"prompt": P, "responses": [...]}`` (2..9,
distinct), or prompt rows (docs/data.md), whose ``rlaif.responses_per_prompt`` responses are sampled from
``model.hf_path`` with the rollout settings (repeated samples are compared once). The judge
(``rlaif.judge_path``) labels them as ``labelers.AILabeler`` describes, and ``<out_dir>/rankings.jsonl``
gets one ranking row per prompt with its soft labels, which ``rm`` trains on (``algorithm.rm.soft_labels``).
The summary counts questions, answers that were not a choice letter, the mean probability on the letters,
and what was dropped.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..config import RunConfig
from ..data.preference import MAX_RANKED, parse_prompt
from ..data.prompts import PromptRow, parse_prompt_row
from ..data.reader import read_rows
from ..labelers import AILabeler
from ..rollout.sampling import GenerationProgress, sample_from_policy
from .common import single_process_run, write_summary


def parse_comparison_row(row: Any) -> tuple[PromptRow, list[str] | None]:
    """``{"prompt", "responses"}`` -> (prompt, responses); a prompt row -> (prompt, None)."""
    if isinstance(row, dict) and "responses" in row:
        if set(row) - {"prompt", "responses"}:
            raise ValueError(f"unknown key(s) {sorted(set(row) - {'prompt', 'responses'})}; a row to label has "
                             "'prompt' and 'responses'")
        ys = row["responses"]
        if not isinstance(ys, list) or not 2 <= len(ys) <= MAX_RANKED or not all(isinstance(y, str) and y for y in ys):
            raise ValueError(f"'responses' must be a list of 2..{MAX_RANKED} non-empty strings")
        if len(set(ys)) != len(ys):
            raise ValueError("'responses' repeats a response; list each once")
        return PromptRow(parse_prompt(row.get("prompt"))), list(ys)
    return parse_prompt_row(row), None


def run_rlaif(cfg: RunConfig) -> dict[str, Any]:
    start = time.perf_counter()
    if cfg.data.train_path is None:
        raise ValueError("rlaif reads the rows to label from data.train_path")
    rt, out = single_process_run(cfg, "rlhf-engine rlaif labels in one process")
    parsed = read_rows(cfg.data.train_path, parse_comparison_row)
    rows = [p for p, _ in parsed]
    to_sample = [i for i, (_, ys) in enumerate(parsed) if ys is None]
    responses = [ys for _, ys in parsed]
    if to_sample:
        if cfg.model.hf_path is None:
            raise ValueError(f"{cfg.data.train_path} has prompt rows without responses: set model.hf_path to the "
                             "policy to sample them from")
        k = cfg.rlaif.responses_per_prompt
        with GenerationProgress(f"rlaif: {k} samples for each of {len(to_sample)} prompts"):
            sampled = sample_from_policy(cfg.model.hf_path, [rows[i] for i in to_sample], cfg, k, cfg.trainer.seed * 7 + 3)
        for i, ys in zip(to_sample, sampled):
            responses[i] = list(dict.fromkeys(y for y in ys if y))  # a repeated sample is one response
    keep = [i for i, ys in enumerate(responses) if len(ys) >= 2]
    labeler = AILabeler(cfg.rlaif, cfg.trainer.seed, rt.device)
    labels = labeler.label_all([rows[i] for i in keep], [responses[i] for i in keep])
    written = 0
    path = out / "rankings.jsonl"
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for i, lab in zip(keep, labels):
            if lab is None:
                continue
            prompt = rows[i].prompt if isinstance(rows[i].prompt, str) else [m.__dict__ for m in rows[i].prompt]
            f.write(json.dumps({"prompt": prompt, "responses": responses[i], **lab}) + "\n")
            written += 1
    tmp.replace(path)
    summary = {"rankings": str(path), "rows": len(rows), "labelled": written,
               "fewer_than_two_responses": len(rows) - len(keep), **labeler.report(),
               "wall_s": round(time.perf_counter() - start, 2)}
    write_summary(rt, out, summary)
    return summary
