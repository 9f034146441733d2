"""Online RL (InstructGPT step 3 and its relatives): PPO, PPO-ptx, GRPO / Dr. GRPO, RLOO, REINFORCE++, A2C,
and any algorithm registered in ``rlhf_engine.catalog``.

    rlhf-engine rl --config configs/ppo_tiny.yaml model.hf_path=runs/sft/hf reward.preference_path=runs/rm/hf
    rlhf-engine rl --config configs/ppo_tiny.yaml algorithm.name=grpo algorithm.rl.group=4
    scripts/torchrun.sh 2 rl --config configs/ppo_tiny.yaml parallel.tp=2

The SFT decoder becomes the roles over a frozen trunk of ``model.trunk_layers`` layers
(``rollout/assembly.py``): the trainable policy head, a frozen reference head (a copy of the initial
policy), for critic algorithms (PPO, A2C) a trainable critic head initialised from the reward model
(InstructGPT), and the reward model's head when it shares the trunk. The reward of a response is
``reward.*``'s combination (``rewards.CombinedReward``): learned preference score, rule compliance,
length penalty, format check and programmatic functions.

Prompts are ``data.train_path`` rows (``data/prompts.py``), or the built-in demo set's prompts with their
answers. Evaluation samples ``algorithm.rl.eval_prompts`` held-out prompts with a fixed seed and reports
their mean reward and KL to the reference. The final policy is exported as a Hugging Face checkpoint
under ``<out_dir>/hf``; ``summary.json`` has reward and KL before and after.
"""

from __future__ import annotations

from typing import Any

import torch

from ..algorithms.rl import resolve, rl_objective, settings_dict
from ..catalog import RL_ALGORITHMS, command_of
from ..config import RunConfig
from ..data.chat import pad_id
from ..data.demonstrations import pretraining_examples, sft_stream
from ..data.prompts import PromptItem, load_prompt_rows, prompt_item, prompt_texts
from ..data.reader import DataError
from ..models.roles import RoleModel, measure_sharing
from ..parallel.dims import LayoutError
from ..parallel.runtime import DTYPES, Runtime
from ..rollout.assembly import build_roles, generation_copy
from ..rollout.experience import ExperienceMaker
from ..rollout.stream import ExperienceStream, make_all_done
from ..trainer import ParamGroup
from .common import StageContext, StageSetup, base_model, export_policy, run_stage


def ptx_stream(cfg: RunConfig, tokenizer, pad: int):
    """PPO-ptx's pretraining rows as a global stream (every rank builds it; each takes its share)."""
    c = cfg.algorithm.rl
    if c.ptx_coef == 0:
        return None
    if cfg.data.pretrain_path is None:
        raise DataError("algorithm.rl.ptx_coef > 0 needs data.pretrain_path (plain-text or chat rows)")
    examples = pretraining_examples(cfg.data.pretrain_path, tokenizer, cfg)
    return sft_stream(examples, cfg, pad, micro_batch_size=c.ptx_micro_batch_size)


def one_step_per_rollout(cfg: RunConfig, rt: Runtime) -> bool:
    c, t = cfg.algorithm.rl, cfg.trainer
    local = c.prompts_per_rollout // rt.dims.dp * c.group
    # One step off-policy too: the experience pass and the one step run at the same weights, so the step's own
    # forward gives the trainer's log-probs (the old ones, and the tis weights against the sampler's)
    return c.epochs == 1 and local == t.micro_batch_size * t.grad_accum_steps and c.kl_stop is None


class RLEvaluator:
    """Held-out reward and KL: every rank samples the same prompts once with a fixed seed. ``samples``
    keeps the last evaluation's first responses for the summary."""

    def __init__(self, maker: ExperienceMaker, prompts: list[PromptItem], cfg: RunConfig, rt: Runtime) -> None:
        self.maker, self.prompts, self.cfg, self.rt = maker, prompts, cfg, rt
        self.samples: list[dict[str, Any]] = []

    def __call__(self, model) -> dict[str, float]:
        if not self.prompts:
            return {}
        g = torch.Generator(device=self.rt.device).manual_seed(self.cfg.trainer.seed + 12345)
        r = self.maker(self.prompts, g, group=1)
        out = {"eval_reward": float(r.scores.mean()), "eval_kl": float(r.seq_kl().mean()),
               "eval_response_length": float(r.response_lengths().float().mean())}
        out.update({f"eval_reward_{k}": float(v.float().mean()) for k, v in r.parts.items()})
        self.samples = [{"prompt": p, "response": y, "reward": round(float(s), 4)}
                        for p, y, s in zip(r.prompts[:4], r.responses[:4], r.scores[:4])]
        return out


def setup_rl(ctx: StageContext) -> StageSetup:
    cfg, rt = ctx.cfg, ctx.rt
    name = cfg.algorithm.name
    train_rows, eval_rows = load_prompt_rows(cfg)
    tokenizer = ctx.tokenizer(t for row in train_rows for t in prompt_texts(row))
    pad = pad_id(tokenizer)
    sft = base_model(cfg, tokenizer)
    settings = resolve(name, cfg.algorithm.rl, max_new_tokens=cfg.rollout.max_new_tokens,
                       temperature=cfg.rollout.temperature)
    roles, reward, bias = build_roles(cfg, sft, settings, rt.device)
    reward.pad_id = pad
    del sft
    model = rt.parallelize(roles, cfg)
    max_prompt = cfg.data.seq_len - cfg.rollout.max_new_tokens
    if max_prompt < 1:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} leaves no room for prompts after "
                         f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}")
    prompts = [prompt_item(tokenizer, r, max_prompt) for r in train_rows]
    held_out = [prompt_item(tokenizer, r, max_prompt) for r in eval_rows[: cfg.algorithm.rl.eval_prompts]]
    # Under pipeline parallelism decoding runs on the policy gathered whole per rank (pp folds into dp);
    # the experience forward and the update run through the stages.
    copy = (lambda: generation_copy(model, rt, DTYPES[cfg.precision.dtype])) if rt.dims.pp > 1 else None
    maker = ExperienceMaker(model, tokenizer, reward, settings, cfg.rollout, pad_id=pad, reward_head_bias=bias,
                            all_done=make_all_done(rt), on_policy=one_step_per_rollout(cfg, rt), generation_model=copy)
    stream = ExperienceStream(maker, prompts, settings, cfg, rt, ptx=ptx_stream(cfg, tokenizer, pad))
    evaluate = RLEvaluator(maker, held_out, cfg, rt)
    groups = [ParamGroup("critic", lambda n: "heads.critic." in n, cfg.optim.critic_lr)] \
        if settings.critic and cfg.optim.critic_lr is not None else []

    def sharing() -> dict[str, Any]:
        """One process with a shared trunk: its savings against separate models, measured on the last rollout."""
        b = stream.buffer
        if b is None or rt.world_size > 1 or not isinstance(model, RoleModel) or model.trunk is None:
            return {}
        model.eval()
        return {"shared_trunk": measure_sharing(model, b.input_ids, document_ids=b.document_ids, targets=b.targets)}

    def summarize(result: dict[str, Any]) -> dict[str, Any]:
        first, final = result["first_eval"], result["final_eval"]
        return {**settings_dict(settings), "rollouts": stream.rollout_index, **sharing(),
                "reward_model_on_shared_trunk": bias is not None,
                "eval_reward_initial": first.get("eval_reward"), "eval_reward_final": final.get("eval_reward"),
                "eval_kl_final": final.get("eval_kl"), "kl_coef_final": stream.kl.value,
                "eval_response_length_final": final.get("eval_response_length")}

    def export(out) -> dict[str, Any]:
        done = export_policy(model, out, tokenizer, rt, lambda: RoleModel(model.config, model.trunk_layers,
                                                                            roles=model.roles, lora=cfg.model.lora), cfg)
        return {**done, "samples": evaluate.samples}

    heads = ", ".join(r.value for r in model.roles)
    return StageSetup(model, rl_objective(settings), stream,
                      f"heads {heads}, {len(prompts)} train / {len(held_out)} held-out prompts",
                      evaluate=evaluate, param_groups=groups, summarize=summarize, export=export)


def run_rl(cfg: RunConfig) -> dict[str, Any]:
    if command_of(cfg.algorithm.name) != "rl":
        raise ValueError(f"algorithm.name={cfg.algorithm.name!r} is not an online RL algorithm "
                         f"({', '.join(RL_ALGORITHMS)})")
    if cfg.parallel.sequence_parallel:
        raise LayoutError("parallel.sequence_parallel: RL decodes one token per step, which cannot be split over "
                          "the sequence; use parallel.tp without sequence parallelism")
    return run_stage(cfg, cfg.algorithm.name, setup_rl)
