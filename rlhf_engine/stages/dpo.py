"""Offline preference optimisation: DPO, conservative DPO and IPO on a policy over a frozen reference.

    rlhf-engine dpo --config configs/dpo_tiny.yaml model.hf_path=runs/sft/hf data.train_path=pairs.jsonl

Rows are ``{"prompt", "chosen", "rejected"}`` or K-wise rankings (every untied pair is a preference);
prompts are chat messages or plain text (docs/data.md). The model is the SFT decoder as two roles over a
shared trunk of ``model.trunk_layers`` frozen layers: the trainable policy head and the frozen reference
head, a copy of the initial policy (k = 0: two full models, as in TRL). The final policy is exported as a
Hugging Face checkpoint under ``<out_dir>/hf``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..algorithms.dpo import dpo_objective
from ..config import RunConfig
from ..data.preference import parse_ranking
from ..models.hf import save_hf_model
from ..models.roles import Role, RoleModel
from ..parallel.checkpoint import gather_model
from ..parallel.runtime import init_runtime
from ..trainer import Trainer
from .common import announce, base_model, build_tokenizer, open_run, write_summary
from .reward import RowBatcher, load_rows, texts_of

DPO_ROLES = (Role.POLICY, Role.REFERENCE)


def run_dpo(cfg: RunConfig) -> dict[str, Any]:
    start = time.perf_counter()
    rt = init_runtime(cfg)
    out = open_run(cfg, rt)
    train_rows, eval_rows = load_rows(cfg, parse_ranking)
    tokenizer = build_tokenizer(cfg, texts_of(train_rows), rt, out)
    sft = base_model(cfg, tokenizer)
    model = rt.parallelize(RoleModel.from_sft(sft, cfg.model.trunk_layers, roles=DPO_ROLES), cfg)
    del sft
    train, held_out = (RowBatcher(cfg, tokenizer, rows, "pairs") for rows in (train_rows, eval_rows))
    announce(rt, "dpo", model, f"{len(train_rows)} train / {len(eval_rows)} held-out rows")

    d = cfg.algorithm.dpo
    trainer = Trainer(cfg, rt, model, dpo_objective(d.loss_type, d.beta, d.label_smoothing), train.stream(),
                      name="dpo", eval_batches=held_out.fixed(cfg.trainer.eval_batches))
    result = trainer.fit()
    summary: dict[str, Any] = {
        "algorithm": f"dpo/{d.loss_type}", "steps": result["step"], "finished": result["finished"],
        "resumed": result["resumed"], "train_rows": len(train_rows), "heldout_rows": len(eval_rows),
        "heldout_reward_accuracy_initial": result["first_eval"].get("eval_accuracy"),
        "heldout_reward_accuracy": result["final_eval"].get("eval_accuracy"),
        "heldout_margin": result["final_eval"].get("eval_margin"),
        "heldout_loss": result["final_eval"].get("eval_loss"),
    }
    if result["finished"]:
        plain = gather_model(model, lambda: RoleModel(model.config, model.trunk_layers, roles=DPO_ROLES))
        if plain is not None:
            save_hf_model(plain.policy_model(), Path(out) / "hf", tokenizer=tokenizer)
        rt.barrier()
        summary["export"] = str(Path(out) / "hf")
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    write_summary(rt, out, summary)
    return summary
