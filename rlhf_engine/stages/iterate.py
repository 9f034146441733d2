"""Iterated RLHF (InstructGPT's collect -> RM -> PPO loop, repeated; Bai et al. 2022's "iterated online"):

    rlhf-engine iterate --config configs/iterate_tiny.yaml

Each round r, under ``<out_dir>/round_<r>/``:
  1. sample K = ``iterate.responses_per_prompt`` responses from the current policy (the SFT export in
     round 0, then the previous round's RL export) for ``iterate.prompts_per_round`` training prompts;
  2. have the labeler rank them (``labelers.py``: programmatic, an AI labeler, or people through a file)
     -> ``rankings.jsonl``;
  3. score the new comparisons with the previous round's RM: its accuracy on the *current* policy's
     samples, the distribution shift the loop exists to correct;
  4. retrain the ranking RM from ``model.hf_path`` on every round's comparisons so far (``rm/``), with the
     same frozen trunk as the policy, so it becomes the reward head;
  5. continue RL from the current policy against the new RM for ``iterate.rl_steps`` steps (``rl/``); the
     reference stays the SFT model.

Every step's output is a file, so a rerun skips what is done (and a file labeler's round resumes once
``labels.jsonl`` is written). ``summary.json`` lists each round's RM accuracy on new data, the retrained
RM's held-out accuracy and the RL reward and KL.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from ..config import RunConfig, to_dict
from ..data.chat import pad_id
from ..data.preference import pack_sequences, parse_ranking, tokenize_response
from ..data.prompts import load_prompt_rows
from ..data.reader import read_rows
from ..labelers import build_labeler
from ..models import load_tokenizer
from ..models.score import load_score_model
from ..rollout.sampling import GenerationProgress, sample_from_policy
from .common import derive, single_process_run, write_summary
from .reward import run_reward_model
from .rl import run_rl


@torch.no_grad()
def ranking_accuracy(rm_path: str, tokenizer, rankings: list, seq_len: int) -> float:
    """Share of the rankings' untied pairs that the RM orders as the labeler did."""
    rm = load_score_model(rm_path).eval()
    right = total = 0
    for row in rankings:
        seqs = pack_sequences([tokenize_response(tokenizer, row.prompt, y) for y in row.responses], seq_len,
                              pad_id(tokenizer))
        scores = seqs.read_score(rm(seqs.input_ids, document_ids=seqs.document_ids)[..., 0], rm.pooling).tolist()
        for w, lo in row.pairs():
            right += scores[w] > scores[lo]
            total += 1
    return right / max(total, 1)


def run_iterated(cfg: RunConfig) -> dict[str, Any]:
    start = time.perf_counter()
    it, sft_path = cfg.iterate, cfg.model.hf_path
    if sft_path is None:
        raise ValueError("iterated RLHF starts from an SFT export: set model.hf_path (and model.architecture: null)")
    rt, out = single_process_run(cfg, "rlhf-engine iterate runs its rounds in one process; launch the rm and rl "
                                      "stages under torchrun yourself for multi-GPU rounds")
    tokenizer = load_tokenizer(cfg.model.tokenizer_path or sft_path)
    train_rows, _ = load_prompt_rows(cfg)
    policy, rm_path = sft_path, None
    rounds: list[dict[str, Any]] = []
    all_rankings = out / "rankings_all.jsonl"
    for r in range(it.rounds):
        rd = out / f"round_{r}"
        rd.mkdir(exist_ok=True)
        info: dict[str, Any] = {"round": r, "policy": policy}
        ranked = rd / "rankings.jsonl"
        if not ranked.exists():
            start_i = (r * it.prompts_per_round) % max(len(train_rows) - it.prompts_per_round, 1)
            rows = train_rows[start_i : start_i + it.prompts_per_round]
            with GenerationProgress(f"round {r}: {it.responses_per_prompt} samples for each of {len(rows)} prompts"):
                responses = sample_from_policy(policy, rows, cfg, it.responses_per_prompt, cfg.trainer.seed * 31 + r)
            responses = [list(dict.fromkeys(ys)) for ys in responses]  # a repeated sample is compared once
            keep = [i for i, ys in enumerate(responses) if len(ys) >= 2]
            rows, responses = [rows[i] for i in keep], [responses[i] for i in keep]
            labeler = build_labeler(cfg, rd, r)
            labels = labeler.label_all(rows, responses)  # ranking (and an AI labeler's soft labels) per prompt
            tmp = ranked.with_suffix(".tmp")
            with tmp.open("w") as f:
                for row, ys, lab in zip(rows, responses, labels):
                    if lab is None:  # the AI labeler's judge gave no usable answer for this prompt
                        continue
                    prompt = row.prompt if isinstance(row.prompt, str) else [m.__dict__ for m in row.prompt]
                    f.write(json.dumps({"prompt": prompt, "responses": ys, **lab}) + "\n")
            tmp.replace(ranked)
            if hasattr(labeler, "report"):
                info["labeler"] = labeler.report()
        new = read_rows(ranked, parse_ranking)
        info["comparisons"] = sum(len(x.pairs()) for x in new)
        if rm_path is not None:
            info["rm_accuracy_on_new_samples"] = ranking_accuracy(rm_path, tokenizer, new, cfg.data.seq_len)
        all_rankings.write_text("".join((out / f"round_{i}" / "rankings.jsonl").read_text() for i in range(r + 1)))
        rm = run_reward_model(derive(
            cfg, "iterate", algorithm={"name": "rm"}, data={"train_path": str(all_rankings), "eval_path": None},
            trainer={"out_dir": str(rd / "rm"), "max_steps": it.rm_steps, "save_every": 0},
            optim={"warmup_steps": 0}))
        rm_path = rm["export"]
        info["rm_heldout_accuracy"] = rm["heldout_accuracy"]
        rl = run_rl(derive(
            cfg, "iterate", algorithm={"name": it.rl_algorithm, "rl": {**to_dict(cfg)["algorithm"]["rl"],
                                                         "init_policy_path": policy if r > 0 else None}},
            reward={"preference_path": rm_path, "functions": {}},
            trainer={"out_dir": str(rd / "rl"), "max_steps": it.rl_steps}))
        policy = rl["export"]
        info.update({k: rl[k] for k in ("eval_reward_initial", "eval_reward_final", "eval_kl_final")})
        info["reward_model_on_shared_trunk"] = rl["reward_model_on_shared_trunk"]
        rounds.append(info)
    summary = {"rounds": rounds, "final_policy": policy, "wall_s": round(time.perf_counter() - start, 2)}
    write_summary(rt, out, summary)
    return summary
