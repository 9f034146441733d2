"""Reward-model stages: InstructGPT's ranking RM, Sparrow's preference model and rule classifier.

    rlhf-engine rm --config configs/rm_tiny.yaml model.hf_path=runs/sft/hf data.train_path=rankings.jsonl
    rlhf-engine train --config configs/sparrow_tiny.yaml      # algorithm.name: sparrow
    rlhf-engine train --config configs/rules_tiny.yaml        # algorithm.name: rules

The model is the SFT decoder cut at ``model.trunk_layers``: the trunk stays frozen and the upper layers
plus a linear score train (k = 0 trains the whole model). Data formats are in ``data/preference.py`` and
docs/data.md. Each micro-batch holds ``trainer.micro_batch_size`` rows with all their responses, each
forwarded once. The trained model is written as a Hugging Face sequence-classification checkpoint under
``<out_dir>/hf`` with the tokenizer; ``summary.json`` reports held-out accuracy before and after.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..algorithms.objective import ModelPass, Objective
from ..algorithms.reward import RULES, choice_objective, ranking_objective, score_inputs
from ..config import RunConfig
from ..data.comparisons import RowBatcher, texts_of
from ..data.preference import parse_choice, parse_ranking, rule_parser
from ..data.streams import StepTotals, load_split
from ..models.score import ScoreModel, save_score_model
from ..parallel.checkpoint import gather_model
from ..trainer import forward_backward
from .common import StageContext, StageSetup, base_model, run_stage
from .probe import resolve_trunk_layers


# algorithm.name -> (row parser, batch kind, objective), each built from the config
KINDS: dict[str, tuple[Callable[[RunConfig], Callable], str, Callable[[RunConfig], Objective]]] = {
    "rm": (lambda cfg: parse_ranking, "pairs",
           lambda cfg: ranking_objective(cfg.algorithm.rm.weighting, cfg.algorithm.rm.pooling)),
    "sparrow": (lambda cfg: parse_choice, "choice",
                lambda cfg: choice_objective(cfg.algorithm.sparrow.bt_weight, cfg.algorithm.sparrow.reg_weight)),
    "rules": (lambda cfg: rule_parser(cfg.algorithm.rules.names), "rules", lambda cfg: RULES),
}


@torch.no_grad()
def mean_response_score(model: ScoreModel, batches: list, device, pooling: str = "last") -> float:
    """Mean score of every sequence in ``batches`` (the training responses), for normalisation; through
    the pipeline's stages under pp > 1."""
    model.eval()

    def passes(b) -> list[ModelPass]:
        def score_sum(out, totals):
            scores = b.seqs.read_score(out[..., 0], pooling)  # (R,)
            return scores.sum(), {"sequences": float(scores.numel())}
        return [ModelPass(score_inputs(b.seqs), score_sum)]

    batches = [b.to(device) for b in batches]
    total, stats = forward_backward(model, Objective(passes, target="sequences"), batches,
                                    StepTotals.unit(StepTotals.of(batches)), train=False)
    return total / max(stats.get("sequences", 0.0), 1)


def _number_of_layers(cfg: RunConfig) -> int:
    if cfg.model.trunk_layers == "auto":
        raise ValueError(f"model.trunk_layers=auto is measured on ranked responses (algorithm.name=rm); for "
                         f"{cfg.algorithm.name} set a number (rlhf-engine probe recommends one)")
    return cfg.model.trunk_layers


def setup_reward_model(ctx: StageContext) -> StageSetup:
    cfg, rt = ctx.cfg, ctx.rt
    name = cfg.algorithm.name
    if name not in KINDS:
        raise ValueError(f"algorithm.name={name!r} is not a reward-model stage ({', '.join(KINDS)})")
    parser, kind, objective = KINDS[name]
    train_rows, eval_rows = load_split(cfg, parser(cfg))
    tokenizer = ctx.tokenizer(texts_of(train_rows))
    labels = cfg.algorithm.rules.names if name == "rules" else None
    lm = base_model(cfg, tokenizer)
    k, probe = resolve_trunk_layers(cfg, lm, tokenizer, train_rows, eval_rows) if name == "rm" else (
        _number_of_layers(cfg), {})
    pooling = cfg.algorithm.rm.pooling if name == "rm" else "last"  # Sparrow and rules read the last token
    head_attention = cfg.algorithm.rm.head_attention if name == "rm" else "copy"
    model = ScoreModel.from_lm(lm, k, len(labels) if labels else 1,
                               generator=torch.Generator().manual_seed(cfg.trainer.seed), lora=cfg.model.lora,
                               pooling=pooling, head_attention=head_attention)
    del lm
    model = rt.parallelize(model, cfg)
    train, held_out = (RowBatcher(cfg, tokenizer, rows, kind) for rows in (train_rows, eval_rows))

    def summarize(result: dict[str, Any]) -> dict[str, Any]:
        return {"algorithm": name, "train_rows": len(train_rows), "heldout_rows": len(eval_rows), "trunk_layers": k,
                "pooling": pooling, "head_attention": head_attention,
                **({"probe": probe} if probe else {}),
                "heldout_accuracy_initial": result["first_eval"].get("eval_accuracy"),
                "heldout_accuracy": result["final_eval"].get("eval_accuracy"),
                "heldout_loss": result["final_eval"].get("eval_loss")}

    def export(out) -> dict[str, Any]:
        extra = {}
        if name == "rm" and cfg.algorithm.rm.normalize:
            shift = mean_response_score(model, train.fixed(), rt.device, pooling)
            model.bias -= shift
            extra["normalization_shift"] = shift
        plain = gather_model(model, lambda: ScoreModel(model.config, model.trunk_layers, model.num_outputs,
                                                       lora=cfg.model.lora, pooling=pooling))
        if plain is not None:
            save_score_model(plain, out / "hf", tokenizer=tokenizer, labels=labels)
        rt.barrier()
        return {**extra, "export": str(out / "hf")}

    return StageSetup(model, objective(cfg), ctx.steps(train.stream()),
                      f"{len(train_rows)} train / {len(eval_rows)} held-out rows",
                      eval_batches=held_out.fixed(cfg.trainer.eval_batches), summarize=summarize, export=export)


def run_reward_model(cfg: RunConfig) -> dict[str, Any]:
    """Train the reward, preference or rule model that ``algorithm.name`` names; export; summarize."""
    return run_stage(cfg, cfg.algorithm.name, setup_reward_model)
