"""Assembling online RL's roles and reward from a config: which heads exist over the shared trunk.

    roles, reward, bias = build_roles(cfg, sft, settings, device)

The policy and the frozen reference head always; for critic algorithms a critic head initialised from
the reward model (InstructGPT); and, when the learned reward model was trained on the same trunk (same
cut, same weights: ``rlhf-engine rm`` from the same SFT export and ``trunk_layers``), its head as the
reward role, so one trunk pass serves all four. A reward model on another trunk runs as its own model
inside the ``CombinedReward``.
"""

from __future__ import annotations

import torch

from ..algorithms.rl import RLSettings
from ..config import RunConfig
from ..data.reader import DataError
from ..models.hf import load_hf_model
from ..models.roles import Role, RoleModel, in_trunk
from ..models.score import ScoreModel, load_score_model
from ..parallel.runtime import Runtime
from ..parallel.tensor_parallel import apply_tensor_parallel
from ..rewards import CombinedReward


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
    if k == "auto":  # the reward model's cut (probed when it was trained): one trunk pass for all four roles
        if rm is None:
            raise ValueError("model.trunk_layers=auto in rl takes the reward model's cut: set reward.preference_path "
                             "to an rlhf-engine rm export, or set a number (rlhf-engine probe recommends one)")
        k = rm.trunk_layers
    shared = rm is not None and shares_trunk(rm, sft, k)
    roles = [Role.POLICY, Role.REFERENCE] + ([Role.CRITIC] if settings.critic else []) + ([Role.REWARD] if shared else [])
    model = RoleModel.from_sft(sft, k, reward=rm, roles=roles, lora=cfg.model.lora, seed=cfg.trainer.seed)
    if cfg.algorithm.rl.init_policy_path is not None:
        if model.lora is not None:
            raise ValueError("algorithm.rl.init_policy_path with model.lora: the LoRA reference is the policy's "
                             "base weights, which a continued policy would replace; give the earlier policy as "
                             "model.hf_path, or train without LoRA")
        continue_policy(model, sft, cfg.algorithm.rl.init_policy_path)
    rules = load_score_model(r.rules_path).to(device) if r.rules_path is not None else None
    separate = rm.to(device) if rm is not None and not shared else None
    reward = CombinedReward(r, preference=separate, rules=rules, seq_len=cfg.data.seq_len, pad_id=0,
                            head_pooling=rm.pooling if shared else "last")
    if not (rm is not None or rules is not None or r.functions or r.format or r.length_target):
        raise DataError("RL needs a reward: reward.preference_path, reward.rules_path, reward.functions, "
                        "reward.format or reward.length_target")
    return model, reward, float(rm.bias[0]) if shared else None


def generation_copy(model, rt: Runtime, dtype: torch.dtype) -> RoleModel:
    """The policy for generation when training runs under pipeline parallelism: trunk + policy head,
    whole on every rank, tensor-parallel over the same tp group (the generation layout is tp x (dp x pp):
    pp folds into the data-parallel degree, as verl's 3D-HybridEngine does). Its weights come from every
    stage by collectives (``PipelinedModel.gather_state``); the caller drops it after generation."""
    state = model.gather_state(lambda name: name.startswith(("trunk.", "heads.policy.")))
    with torch.device("meta"):
        copy = RoleModel(model.config, model.trunk_layers, roles=(Role.POLICY,), lora=model.lora)
    copy.load_state_dict(state, strict=True, assign=True)
    copy.freeze()
    copy.to(device=rt.device, dtype=dtype)
    return apply_tensor_parallel(copy, rt.mesh["tp"], sequence_parallel=False)
