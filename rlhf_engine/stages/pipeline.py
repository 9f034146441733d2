"""The whole InstructGPT pipeline on the built-in task, end to end on a CPU in minutes.

    rlhf-engine quickstart [--out runs/quickstart]                  # the recipe below, built in
    rlhf-engine pipeline --config configs/quickstart.yaml pipeline.rl_algorithm=grpo algorithm.rl.group=4
    rlhf-engine pipeline --config configs/quickstart.yaml model.hf_path=/my/hf/model model.architecture=null

Stages, each in its own directory under ``trainer.out_dir`` (metrics are also merged into the top-level
``metrics.jsonl``; TensorBoard reads the whole directory):

1. ``pretrain/``: next-token training from scratch on the task's plain-text corpus (skipped when
   ``model.hf_path`` names a checkpoint, whose tokenizer and chat template are then used);
2. ``sft/``: SFT on the task's demonstrations (``data/task.py``);
3. ``data/rankings.jsonl``: K samples from the SFT policy per prompt, ranked by a simulated labeler
   (gold score plus noise); a second, independent labeler measures inter-labeler agreement;
4. ``rm/``: the ranking RM, from the SFT export over the same frozen trunk;
5. ``rl/`` (PPO, GRPO, RLOO, REINFORCE++, A2C against the RM, the gold score logged with weight 0) or
   ``dpo/`` (DPO on the same rankings);
6. evaluation of the SFT and final policies on held-out prompts with one fixed seed: gold reward,
   proxy (RM) reward, KL to the SFT policy; ``summary.json`` and ``report.md`` with plots.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..algorithms.rl import resolve
from ..config import RunConfig, load_config
from ..data.chat import pad_id, parse_conversation, tokenize_conversation
from ..data.preference import scores_to_ranking
from ..data.prompts import parse_prompt_row, prompt_item
from ..data.task import build_task, gold_score, label, pair_agreement
from ..models import load_hf_model, load_tokenizer
from ..parallel.runtime import init_runtime
from ..report import write_report
from ..rollout.assembly import build_roles
from ..rollout.experience import ExperienceMaker
from ..rollout.sampling import GenerationProgress, sample_from_policy
from .common import derive, write_summary
from .dpo import run_dpo
from .reward import run_reward_model
from .rl import run_rl
from .sft import run_sft

GOLD = "quickstart_gold"
QUICKSTART = Path(__file__).with_name("quickstart.yaml")  # a copy of configs/quickstart.yaml, shipped in the package


def quickstart_config(overrides: list[str] | None = None) -> RunConfig:
    return load_config(QUICKSTART, overrides)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def make_rankings(cfg: RunConfig, sft_path: str, prompts: list[dict], out: Path) -> dict[str, float]:
    """Sample K responses per prompt from the SFT policy; rank them with labeler A (written) and labeler B
    (for agreement). Identical samples of one prompt are ranked once (a prompt left with one distinct
    response is skipped). Returns inter-labeler and labeler-gold pairwise agreement and those counts."""
    p = cfg.pipeline
    rows = [parse_prompt_row(r) for r in prompts]
    with GenerationProgress(f"rankings: {p.responses_per_prompt} samples for each of {len(rows)} prompts"):
        responses = sample_from_policy(sft_path, rows, cfg, p.responses_per_prompt, cfg.trainer.seed * 7 + 1)
    rng_a, rng_b = random.Random(cfg.trainer.seed * 101 + 1), random.Random(cfg.trainer.seed * 101 + 2)
    ranked, inter, gold_agree, duplicates = [], [0, 0], [0, 0], 0
    for row, prompt, ys in zip(rows, prompts, responses):
        unique = list(dict.fromkeys(ys))  # a repeated sample is no second response to rank (and no tie to label)
        duplicates += len(ys) - len(unique)
        if len(unique) < 2:
            continue
        ys = unique
        gold = [gold_score(row.text, y) for y in ys]
        a, b = label(gold, p.label_noise, rng_a), label(gold, p.label_noise, rng_b)
        truth = scores_to_ranking(gold)
        for acc, other in ((inter, b), (gold_agree, truth)):
            agree, total = pair_agreement(a, other)
            acc[0], acc[1] = acc[0] + agree, acc[1] + total
        ranked.append({"prompt": prompt["prompt"], "responses": ys, "ranking": a})
    _write_jsonl(out / "data" / "rankings.jsonl", ranked)
    return {"labeler_agreement": inter[0] / max(inter[1], 1), "labeler_gold_agreement": gold_agree[0] / max(gold_agree[1], 1),
            "ranked_prompts": len(ranked), "duplicate_samples_dropped": duplicates}


@torch.no_grad()
def evaluate_policy(cfg: RunConfig, sft_path: str, rm_path: str, policy_path: str | None, prompts: list[dict],
                    device) -> dict[str, Any]:
    """Gold reward, proxy (RM) reward and KL to the SFT policy, means over ``pipeline.eval_samples``
    samples per prompt of ``prompts`` (one fixed seed): the roles of the RL stage with the policy head
    loaded from ``policy_path`` (None: the SFT policy itself)."""
    ecfg = derive(cfg, "evaluation", model={"hf_path": sft_path, "architecture": None},
                  algorithm={"name": "reinforce_pp", "rl": {"init_policy_path": policy_path}},
                  reward={"preference_path": rm_path, "functions": {GOLD: 0.0}})
    tok = load_tokenizer(sft_path)
    sft = load_hf_model(sft_path)
    settings = resolve("reinforce_pp", ecfg.algorithm.rl, max_new_tokens=cfg.rollout.max_new_tokens,
                       temperature=cfg.rollout.temperature)
    model, reward, bias = build_roles(ecfg, sft, settings, device)
    reward.pad_id = pad_id(tok)
    model = model.to(device)
    maker = ExperienceMaker(model, tok, reward, settings, cfg.rollout, pad_id=pad_id(tok), reward_head_bias=bias)
    items = [prompt_item(tok, parse_prompt_row(r), cfg.data.seq_len - cfg.rollout.max_new_tokens) for r in prompts]
    with GenerationProgress(f"evaluation: {'final' if policy_path else 'SFT'} policy, {cfg.pipeline.eval_samples} "
                            f"samples for each of {len(items)} prompts"):
        r = maker(items, torch.Generator(device=device).manual_seed(cfg.trainer.seed + 999),
                  group=cfg.pipeline.eval_samples)
    return {"gold": float(r.parts[GOLD].mean()), "proxy": float(r.parts["preference"].mean()),
            "kl": float(r.seq_kl().mean()), "length": float(r.response_lengths().float().mean()),
            "samples": [{"prompt": p, "response": y, "gold": float(g), "proxy": round(float(s), 3)}
                        for p, y, g, s in zip(r.prompts, r.responses, r.parts[GOLD], r.parts["preference"])]
            [:: cfg.pipeline.eval_samples]}  # the first sample of each prompt


@torch.no_grad()
def sft_start(base_path: str, demonstrations: list[dict], limit: int = 200) -> dict[str, float]:
    """Why SFT starts at a high eval loss after pretraining, measured: the pretrained model's loss on the
    demonstrations' assistant tokens, split into the first token of each turn (it follows the chat
    template's opening, which the plain-text corpus never contains), the tokens after the end-of-turn
    token (in pretraining a new document followed it) and the rest; and its loss on the same responses
    as plain text (no template), which separates the template from the responses' own sentences."""
    model, tok = load_hf_model(base_path).eval(), load_tokenizer(base_path)
    sums = {k: [0.0, 0] for k in ("turn_start", "after_turn_end", "content", "plain_text")}

    def nll(ids: list[int]) -> torch.Tensor:  # (len(ids) - 1,) -log p(token | prefix)
        x = torch.tensor([ids])
        logp = torch.log_softmax(model.logits(model(x))[0, :-1].float(), dim=-1)  # (T - 1, V)
        return -logp.gather(1, x[0, 1:, None])[:, 0]

    for row in demonstrations[:limit]:
        conv = parse_conversation(row)
        ids, mask = tokenize_conversation(tok, conv)
        for t, loss in enumerate(nll(ids).tolist(), 1):  # token t, predicted from tokens < t
            if mask[t]:
                kind = ("turn_start" if not mask[t - 1] else
                        "after_turn_end" if ids[t - 1] == tok.eos_token_id else "content")
                sums[kind][0] += loss
                sums[kind][1] += 1
        for msg in conv:
            if msg.role == "assistant":
                plain = list(tok(msg.content)["input_ids"]) + [tok.eos_token_id]
                sums["plain_text"][0] += float(nll(plain).sum())
                sums["plain_text"][1] += len(plain) - 1
    chat = sum(v[0] for k, v in sums.items() if k != "plain_text")
    tokens = sum(v[1] for k, v in sums.items() if k != "plain_text")
    out = {"loss": chat / max(tokens, 1), "uniform_loss": math.log(len(tok))}
    for k, (total, n) in sums.items():
        out[f"{k}_loss"] = total / max(n, 1)
        if k != "plain_text":
            out[f"{k}_share"] = total / max(chat, 1e-12)
    return out


def explain_sft_start(m: dict[str, float], pretrain_loss: float | None, sft_eval: list[tuple[int, float]]) -> str:
    """One paragraph for the report, from ``sft_start``'s measurements, pretraining's last held-out loss
    and SFT's held-out losses ``[(step, eval_loss), ...]``."""
    ended = f" (pretraining's held-out loss ended at {pretrain_loss:.2f})" if pretrain_loss is not None else ""
    later = next(((step, loss) for step, loss in sft_eval if step > 0), None)
    learned = f" SFT's held-out loss is {later[1]:.2f} by step {later[0]}." if later else ""
    template = m["turn_start_share"] + m["after_turn_end_share"]
    return (f"SFT starts from the pretrained model at loss {m['loss']:.2f} on assistant tokens{ended}. "
            f"Pretraining is not lost; the demonstrations are new to it. {template:.0%} of that loss sits on "
            f"the two tokens per turn that the chat template adds and the plain-text corpus never contains: "
            f"the first token after the assistant opening ({m['turn_start_loss']:.1f} nats) and the one after "
            f"the end-of-turn token ({m['after_turn_end_loss']:.1f} nats). The rest ({m['content_loss']:.2f} "
            f"nats per token, against {m['uniform_loss']:.2f} for a uniform guess) is the responses' sentence forms ('The X is A and B.'), which the corpus does "
            f"not use; the same responses as plain text score {m['plain_text_loss']:.2f}.{learned}")


STAGE_WORK = {
    "pretrain": "next-token pretraining from scratch on the task's plain-text corpus",
    "sft": "supervised fine-tuning on chat demonstrations (loss on assistant tokens only)",
    "rankings": "sampling K responses per prompt from the SFT model; simulated labelers rank them",
    "rm": "ranking reward model on those rankings (all pairs per prompt, InstructGPT's loss)",
    "rl": "policy optimisation against the reward model, KL-penalised towards the SFT model",
    "dpo": "direct preference optimisation on the same rankings (offline)",
    "evaluation": "gold and proxy reward, KL and samples of the SFT and final policies; report.md",
}


def run_pipeline(cfg: RunConfig) -> dict[str, Any]:
    start = time.perf_counter()
    p, out = cfg.pipeline, Path(cfg.trainer.out_dir)
    rt = init_runtime(cfg)
    if rt.world_size > 1:
        raise ValueError("the pipeline runs its stages in one process; launch each stage under torchrun instead")
    task = build_task(cfg.trainer.seed, pretrain_rows=p.pretrain_rows, demonstrations=p.demonstrations,
                      prompts=p.ranking_prompts + 200, eval_prompts=p.eval_prompts)
    data = out / "data"
    files = {name: _write_jsonl(data / f"{name}.jsonl", rows) for name, rows in
             (("pretrain", task.pretrain), ("sft", task.demonstrations), ("rank_prompts", task.prompts[: p.ranking_prompts]),
              ("rl_prompts", task.prompts[p.ranking_prompts :]), ("eval_prompts", task.eval_prompts))}
    stage = lambda name, **kw: derive(cfg, name, **kw)  # noqa: E731
    timings: dict[str, float] = {}

    order = (["pretrain"] if cfg.model.hf_path is None else []) + ["sft", "rankings", "rm", p.rl_algorithm
                                                                      if p.rl_algorithm == "dpo" else "rl", "evaluation"]

    def banner(name: str) -> None:
        print(f"\n== stage {order.index(name) + 1}/{len(order)}: {name}: {STAGE_WORK[name]}", file=sys.stderr, flush=True)

    def timed(name, fn, c):
        banner(name)
        t = time.perf_counter()
        result = fn(c)
        timings[name] = round(time.perf_counter() - t, 1)
        return result

    # 1-2: pretraining (from scratch only) and SFT
    if cfg.model.hf_path is None:
        timed("pretrain", lambda c: run_sft(c, name="pretrain"), stage("pretrain", algorithm={"name": "sft"},
              data={"train_path": str(files["pretrain"]), "eval_path": None, "eval_fraction": 0.02},
              optim={"lr": p.pretrain_lr}, trainer={"out_dir": str(out / "pretrain"), "max_steps": p.pretrain_steps}))
        base = str(out / "pretrain" / "hf")
    else:
        base = cfg.model.hf_path
    start_of_sft = None
    if cfg.model.hf_path is None:  # the handoff from pretraining to SFT, measured (the report explains it)
        start_of_sft = sft_start(base, task.demonstrations)
        print(f"pretrained model on the demonstrations: loss {start_of_sft['loss']:.2f}, of which "
              f"{start_of_sft['turn_start_share'] + start_of_sft['after_turn_end_share']:.0%} on the chat "
              f"template's turn boundaries (see report.md)", file=sys.stderr, flush=True)
    from_base = {"hf_path": base, "architecture": None, "tokenizer_path": None}
    timed("sft", run_sft, stage("sft", model=from_base, algorithm={"name": "sft"},
          data={"train_path": str(files["sft"]), "eval_path": None, "eval_fraction": 0.05},
          optim={"lr": p.sft_lr}, trainer={"out_dir": str(out / "sft"), "max_steps": p.sft_steps}))
    sft_path = str(out / "sft" / "hf")
    if start_of_sft is not None:
        ended = [r["eval_loss"] for r in _stage_records(out / "pretrain") if "eval_loss" in r]
        start_of_sft["explanation"] = explain_sft_start(
            start_of_sft, ended[-1] if ended else None,
            [(r["step"], r["eval_loss"]) for r in _stage_records(out / "sft") if "eval_loss" in r])
    from_sft = {"hf_path": sft_path, "architecture": None, "tokenizer_path": None}

    # 3-4: rankings of SFT samples by simulated labelers, the ranking RM
    banner("rankings")
    t = time.perf_counter()
    labels = make_rankings(cfg, sft_path, task.prompts[: p.ranking_prompts], out)
    timings["rankings"] = round(time.perf_counter() - t, 1)
    rm = timed("rm", run_reward_model, stage("rm", model=from_sft, algorithm={"name": "rm"},
               data={"train_path": str(data / "rankings.jsonl"), "eval_path": None, "eval_fraction": 0.1},
               optim={"lr": p.rm_lr}, trainer={"out_dir": str(out / "rm"), "max_steps": p.rm_steps}))
    rm_path = rm["export"]

    # 5: policy optimisation against the RM (or DPO on the rankings)
    if p.rl_algorithm == "dpo":
        final = timed("dpo", run_dpo, stage("dpo", model=from_sft, algorithm={"name": "dpo"},
                      data={"train_path": str(data / "rankings.jsonl"), "eval_path": None, "eval_fraction": 0.1},
                      optim={"lr": p.rl_lr}, trainer={"out_dir": str(out / "dpo"), "max_steps": p.rl_steps}))
    else:
        final = timed("rl", run_rl, stage("rl", model=from_sft, algorithm={"name": p.rl_algorithm},
                      data={"train_path": str(files["rl_prompts"]), "eval_path": str(files["eval_prompts"])},
                      reward={"preference_path": rm_path, "functions": {GOLD: 0.0}},
                      optim={"lr": p.rl_lr}, trainer={"out_dir": str(out / "rl"), "max_steps": p.rl_steps}))
    policy_path = final["export"]

    # 6: evaluation, summary, report
    banner("evaluation")
    t = time.perf_counter()
    before = evaluate_policy(cfg, sft_path, rm_path, None, task.eval_prompts, rt.device)
    after = evaluate_policy(cfg, sft_path, rm_path, policy_path, task.eval_prompts, rt.device)
    timings["evaluation"] = round(time.perf_counter() - t, 1)
    summary = {
        "rl_algorithm": p.rl_algorithm, "seed": cfg.trainer.seed,
        "rm_heldout_accuracy": rm["heldout_accuracy"], **labels,
        "gold_reward_sft": before["gold"], "gold_reward_rl": after["gold"],
        "proxy_reward_sft": before["proxy"], "proxy_reward_rl": after["proxy"],
        "kl_final": after["kl"], "response_length_sft": before["length"], "response_length_rl": after["length"],
        "final_policy": policy_path, "shared_trunk": final.get("shared_trunk"), "sft_start": start_of_sft, "stage_seconds": timings, "wall_s": round(time.perf_counter() - start, 1),
    }
    merge_metrics(out, [s for s in ("pretrain", "sft", "rm", "rl", "dpo") if (out / s / "metrics.jsonl").exists()])
    write_report(out, summary, before["samples"][:6], after["samples"][:6])
    write_summary(rt, out, summary)
    return summary


def _stage_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]


def merge_metrics(out: Path, stages: list[str]) -> None:
    """Every stage's records (each tagged with its stage) in one top-level ``metrics.jsonl``."""
    lines = [json.dumps({"pipeline_stage": s, **r}) for s in stages for r in _stage_records(out / s)]
    tmp = out / ".metrics.jsonl.tmp"
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(out / "metrics.jsonl")
