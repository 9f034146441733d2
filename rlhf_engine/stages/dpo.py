"""Offline preference optimisation: DPO, conservative DPO and IPO on a policy over a frozen reference.

    rlhf-engine dpo --config configs/dpo_tiny.yaml model.hf_path=runs/sft/hf data.train_path=pairs.jsonl

Rows are ``{"prompt", "chosen", "rejected"}`` or K-wise rankings (every untied pair is a preference);
prompts are chat messages or plain text (docs/data.md). The model is the SFT decoder as two roles over a
shared trunk of ``model.trunk_layers`` frozen layers: the trainable policy head and the frozen reference
head, a copy of the initial policy (k = 0: two full models, as in TRL). The final policy is exported as a
Hugging Face checkpoint under ``<out_dir>/hf``.
"""

from __future__ import annotations

from typing import Any

from ..algorithms.dpo import dpo_objective
from ..config import RunConfig
from ..data.comparisons import RowBatcher, texts_of
from ..data.preference import parse_ranking
from ..data.streams import load_split
from ..models.roles import Role, RoleModel
from .common import StageContext, StageSetup, base_model, export_policy, run_stage
from .probe import resolve_trunk_layers

DPO_ROLES = (Role.POLICY, Role.REFERENCE)


def setup_dpo(ctx: StageContext) -> StageSetup:
    cfg, rt = ctx.cfg, ctx.rt
    train_rows, eval_rows = load_split(cfg, parse_ranking)
    tokenizer = ctx.tokenizer(texts_of(train_rows))
    sft = base_model(cfg, tokenizer)
    k, probe = resolve_trunk_layers(cfg, sft, tokenizer, train_rows, eval_rows)
    model = rt.parallelize(RoleModel.from_sft(sft, k, roles=DPO_ROLES, lora=cfg.model.lora, seed=cfg.trainer.seed), cfg)
    del sft
    train, held_out = (RowBatcher(cfg, tokenizer, rows, "pairs") for rows in (train_rows, eval_rows))
    d = cfg.algorithm.dpo

    def summarize(result: dict[str, Any]) -> dict[str, Any]:
        first, final = result["first_eval"], result["final_eval"]
        return {"algorithm": f"dpo/{d.loss_type}", "train_rows": len(train_rows), "heldout_rows": len(eval_rows),
                "trunk_layers": k, **({"probe": probe} if probe else {}),
                "heldout_reward_accuracy_initial": first.get("eval_accuracy"),
                "heldout_reward_accuracy": final.get("eval_accuracy"), "heldout_margin": final.get("eval_margin"),
                "heldout_loss": final.get("eval_loss")}

    return StageSetup(model, dpo_objective(d.loss_type, d.beta, d.label_smoothing), ctx.steps(train.stream()),
                      f"{len(train_rows)} train / {len(eval_rows)} held-out rows",
                      eval_batches=held_out.fixed(cfg.trainer.eval_batches), summarize=summarize,
                      export=lambda out: export_policy(model, out, tokenizer, rt, lambda: RoleModel(
                          model.config, model.trunk_layers, roles=DPO_ROLES, lora=cfg.model.lora), cfg))


def run_dpo(cfg: RunConfig) -> dict[str, Any]:
    return run_stage(cfg, "dpo", setup_dpo)
