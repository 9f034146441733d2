"""Online RL (InstructGPT step 3 and its relatives): PPO, PPO-ptx, GRPO / Dr. GRPO, RLOO, REINFORCE++, A2C.

    rlhf-engine rl --config configs/ppo_tiny.yaml model.hf_path=runs/sft/hf reward.preference_path=runs/rm/hf
    rlhf-engine rl --config configs/grpo_tiny.yaml              # programmatic reward on the built-in prompts
    scripts/torchrun.sh 2 rl --config configs/ppo_tiny.yaml parallel.tp=2

The SFT decoder becomes the roles over a frozen trunk of ``model.trunk_layers`` layers: the trainable
policy head, a frozen reference head (a copy of the initial policy), for critic algorithms (PPO, A2C) a
trainable critic head initialised from the reward model (InstructGPT), and, when the learned reward
model was trained on the same trunk (``rlhf-engine rm`` from the same SFT export and ``trunk_layers``),
its head as the reward role: one trunk pass then serves policy, reference, critic and reward. A reward
model on another trunk is run as its own model. The reward of a response is ``reward.*``'s combination
(``rewards.CombinedReward``): learned preference score, rule compliance, length penalty, format check
and programmatic functions.

Prompts are ``data.train_path`` rows (``data/prompts.py``), or the built-in demo set's prompts with their
answers. Evaluation samples ``algorithm.rl.eval_prompts`` held-out prompts with a fixed seed and reports
their mean reward and KL to the reference. The final policy is exported as a Hugging Face checkpoint
under ``<out_dir>/hf``; ``summary.json`` has reward and KL before and after.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..algorithms.rl import RL_ALGORITHMS, RLSettings, resolve, rl_objective, settings_dict
from ..config import RunConfig
from ..data.builtin import demo_conversations
from ..data.chat import parse_sft_row
from ..data.indexed import indexed_examples, is_indexed
from ..data.prompts import PromptItem, parse_prompt_row, prompt_item, prompt_texts
from ..data.reader import DataError, read_rows
from ..models.hf import load_hf_model, save_hf_model
from ..models.roles import Role, RoleModel, in_trunk
from ..models.score import ScoreModel, load_score_model
from ..parallel.checkpoint import gather_model
from ..parallel.dims import LayoutError
from ..parallel.runtime import Runtime, init_runtime
from ..rewards import CombinedReward
from ..rollout.experience import ExperienceMaker
from ..rollout.stream import ExperienceStream, make_all_done
from ..trainer import Trainer
from .common import announce, base_model, build_tokenizer, load_split, open_run, pad_id, write_summary
from .sft import sft_stream, to_examples

RL_NAMES = tuple(RL_ALGORITHMS)


def load_prompt_rows(cfg: RunConfig) -> tuple[list, list]:
    """(train, held-out) prompt rows: files, or the built-in demo set's prompts and answers."""
    return load_split(cfg, parse_prompt_row, lambda: [parse_prompt_row(r) for r in
                                                       demo_conversations(cfg.data.builtin_rows, seed=cfg.trainer.seed)])


def same_trunk(state: dict[str, torch.Tensor], sft, k: int) -> bool:
    """Whether a decoder state (our names) holds exactly the SFT model's frozen trunk (embedding, layers < k)."""
    sft_state = sft.state_dict()
    names = [n for n in sft_state if in_trunk(n, k)]
    return all(n in state and state[n].shape == sft_state[n].shape and torch.equal(state[n].float(), sft_state[n].float())
               for n in names)


def shares_trunk(rm: ScoreModel, sft, k: int) -> bool:
    """Whether the reward model's frozen trunk is exactly the policy's (same cut, same weights)."""
    untied = lambda c: {**c.__dict__, "tie_word_embeddings": False}  # noqa: E731
    if k == 0 or rm.trunk_layers != k or untied(rm.config) != untied(sft.config):
        return False
    return same_trunk(rm.full_state_dict(), sft, k)


def continue_policy(model: RoleModel, sft, path: str) -> None:
    """Load an earlier policy export's layers above the trunk and LM head into the policy head."""
    prev = load_hf_model(path)
    k = model.trunk_layers
    if k and not same_trunk(prev.state_dict(), sft, k):
        raise ValueError(f"algorithm.rl.init_policy_path={path}: its lower {k} layers differ from model.hf_path's "
                         "frozen trunk; continue only from a policy trained on this trunk")
    src, head = prev.state_dict(), model.head(Role.POLICY)
    state = {n: (prev.output_weight if n == "lm_head.weight" else src[n]).detach().clone() for n in head.state_dict()}
    head.load_state_dict(state)


def build_roles(cfg: RunConfig, sft, settings: RLSettings, device) -> tuple[RoleModel, CombinedReward, float | None]:
    """(roles, reward, reward-head bias or None): see the module docstring for which heads are built."""
    r, k = cfg.reward, cfg.model.trunk_layers
    rm = load_score_model(r.preference_path) if r.preference_path is not None else None
    shared = rm is not None and shares_trunk(rm, sft, k)
    roles = [Role.POLICY, Role.REFERENCE] + ([Role.CRITIC] if settings.critic else []) + ([Role.REWARD] if shared else [])
    model = RoleModel.from_sft(sft, k, reward=rm, roles=roles)
    if cfg.algorithm.rl.init_policy_path is not None:
        continue_policy(model, sft, cfg.algorithm.rl.init_policy_path)
    rules = load_score_model(r.rules_path).to(device) if r.rules_path is not None else None
    separate = rm.to(device) if rm is not None and not shared else None
    reward = CombinedReward(r, preference=separate, rules=rules, seq_len=cfg.data.seq_len, pad_id=0)
    if not (rm is not None or rules is not None or r.functions or r.format or r.length_target):
        raise DataError("RL needs a reward: reward.preference_path, reward.rules_path, reward.functions, "
                        "reward.format or reward.length_target")
    return model, reward, float(rm.bias[0]) if shared else None


def ptx_stream(cfg: RunConfig, tokenizer, pad: int):
    c = cfg.algorithm.rl
    if c.ptx_coef == 0:
        return None
    if cfg.data.pretrain_path is None:
        raise DataError("algorithm.rl.ptx_coef > 0 needs data.pretrain_path (plain-text or chat rows)")
    path = cfg.data.pretrain_path
    if is_indexed(path):  # a Megatron corpus: fixed-length samples from the C++ sample index
        examples = indexed_examples(path, cfg.data.seq_len, cfg.trainer.seed)
    else:
        examples = to_examples(tokenizer, read_rows(path, parse_sft_row), cfg.data.seq_len)
    return sft_stream(examples, cfg, pad, micro_batch_size=c.ptx_micro_batch_size)


def one_step_per_rollout(cfg: RunConfig, rt: Runtime) -> bool:
    c, t = cfg.algorithm.rl, cfg.trainer
    local = c.prompts_per_rollout // rt.dims.dp * c.group
    return c.epochs == 1 and local == t.micro_batch_size * t.grad_accum_steps and c.kl_stop is None


def evaluator(maker: ExperienceMaker, prompts: list[PromptItem], cfg: RunConfig, rt: Runtime):
    """Held-out reward and KL: every rank samples the same prompts once with a fixed seed."""

    def evaluate(model) -> dict[str, float]:
        if not prompts:
            return {}
        g = torch.Generator(device=rt.device).manual_seed(cfg.trainer.seed + 12345)
        r = maker(prompts, g, group=1)
        out = {"eval_reward": float(r.scores.mean()), "eval_kl": float(r.seq_kl().mean()),
               "eval_response_length": float(r.response_lengths().float().mean())}
        out.update({f"eval_reward_{k}": float(v.float().mean()) for k, v in r.parts.items()})
        evaluate.samples = [{"prompt": p, "response": y, "reward": round(float(s), 4)}
                            for p, y, s in zip(r.prompts[:4], r.responses[:4], r.scores[:4])]
        return out

    evaluate.samples = []
    return evaluate


def run_rl(cfg: RunConfig) -> dict[str, Any]:
    start = time.perf_counter()
    name = cfg.algorithm.name
    if name not in RL_NAMES:
        raise ValueError(f"algorithm.name={name!r} is not an online RL algorithm ({', '.join(RL_NAMES)})")
    if cfg.parallel.sequence_parallel:
        raise LayoutError("parallel.sequence_parallel: RL decodes one token per step, which cannot be split over "
                          "the sequence; use parallel.tp without sequence parallelism")
    rt = init_runtime(cfg)
    out = open_run(cfg, rt)
    train_rows, eval_rows = load_prompt_rows(cfg)
    tokenizer = build_tokenizer(cfg, (t for row in train_rows for t in prompt_texts(row)), rt, out)
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
    maker = ExperienceMaker(model, tokenizer, reward, settings, cfg.rollout, pad_id=pad, reward_head_bias=bias,
                            all_done=make_all_done(rt), on_policy=one_step_per_rollout(cfg, rt))
    stream = ExperienceStream(maker, prompts, settings, cfg, rt, ptx=ptx_stream(cfg, tokenizer, pad))
    heads = ", ".join(r.value for r in model.roles)
    announce(rt, name, model, f"heads {heads}, {len(prompts)} train / {len(held_out)} held-out prompts")

    evaluate = evaluator(maker, held_out, cfg, rt)
    trainer = Trainer(cfg, rt, model, rl_objective(settings), stream, name=name, evaluate=evaluate)
    result = trainer.fit()
    first, final = result["first_eval"], result["final_eval"]
    summary: dict[str, Any] = {
        **settings_dict(settings), "steps": result["step"], "finished": result["finished"],
        "resumed": result["resumed"], "rollouts": stream.rollout_index, "world_size": rt.world_size,
        "reward_model_on_shared_trunk": bias is not None,
        "eval_reward_initial": first.get("eval_reward"), "eval_reward_final": final.get("eval_reward"),
        "eval_kl_final": final.get("eval_kl"), "kl_coef_final": stream.kl.value,
        "eval_response_length_final": final.get("eval_response_length"),
    }
    if result["finished"]:
        plain = gather_model(model, lambda: RoleModel(model.config, model.trunk_layers, roles=model.roles))
        if plain is not None:
            save_hf_model(plain.policy_model(), Path(out) / "hf", tokenizer=tokenizer)
        rt.barrier()
        summary["export"] = str(Path(out) / "hf")
        summary["samples"] = evaluate.samples
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    write_summary(rt, out, summary)
    return summary
