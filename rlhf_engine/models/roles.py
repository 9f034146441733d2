"""RL roles over a shared frozen trunk: policy, reference, critic and reward heads (Sparrow-style).

The SFT decoder is cut at layer k. The *trunk* (token embedding + layers [0, k)) is frozen and stored
once; each role owns layers [k, L), a final norm and its output:

    policy     trainable   LM head              log-probs, entropy (and exact KL against the reference)
    reference  frozen      LM head              a copy of the initial policy head
    critic     trainable   scalar head          per-token values; initialised from the reward head
    reward     frozen      scalar head          the score read at the last response token

With LoRA (``model.lora.rank > 0``, ``models/lora.py``) the policy and critic heads keep their weights
frozen and train low-rank adapters; the reference is the policy head with its adapters off, so no
reference head is built or stored.

``k = 0`` gives four separate models (each head embeds for itself): the baseline that benchmarks compare
against. One call runs the trunk once and any subset of heads on its boundary states:

    roles = RoleModel.from_sft(sft_model, trunk_layers=k, reward=reward_model)
    out = roles(input_ids, document_ids=docs, targets=targets, roles={Role.POLICY, Role.REFERENCE, Role.CRITIC})
    out.logp, out.kl, out.values, out.trunk_states

During PPO epochs the boundary states of a rollout batch are cached (``encode_trunk``) and passed back as
``trunk_states``: no trunk recompute and no trunk backward. Everything is computed inside ``forward`` so
that FSDP2, which gathers parameters around a module's forward, holds every head's output weights while
they are used. Head layers keep their global indices, so one ``KVCache`` of L layers serves trunk +
policy during generation, and the tensor-parallel plan applies to trunk and heads unchanged.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import torch
from pydantic import TypeAdapter
from safetensors.torch import load_file, save_file
from rlhf_kernels import linear_logprob
from torch import nn

from ..config.model import LoRAConfig
from .hf import atomic_directory
from .lora import adapters_disabled, apply_lora, fresh_adapter, freeze_base, is_adapter, merge_lora_state
from .transformer import KVCache, LayerSpec, Transformer, TransformerConfig, local_vocab_shard


class Role(enum.Enum):
    POLICY = "policy"
    REFERENCE = "reference"
    CRITIC = "critic"
    REWARD = "reward"


TRAINABLE = {Role.POLICY: True, Role.REFERENCE: False, Role.CRITIC: True, Role.REWARD: False}
LM_ROLES = (Role.POLICY, Role.REFERENCE)
SCALAR_ROLES = (Role.CRITIC, Role.REWARD)


class RoleHead(Transformer):
    """Layers [k, L) + final norm + an output: an LM head (V, D) or a scalar head (num_outputs, D).

    A ``Transformer`` slice, so its forward maps boundary states (or tokens when k = 0) to final hidden
    states with the same masks, positions and cache handling as the full model. Roles never tie the LM
    head to the embedding: the policy's head trains while the embedding sits in the frozen trunk.
    """

    def __init__(self, cfg: TransformerConfig, trunk_layers: int, kind: str, spec: LayerSpec = LayerSpec(),
                 num_outputs: int = 1) -> None:
        if kind not in ("lm", "scalar"):
            raise ValueError(f"kind must be 'lm' or 'scalar', got {kind!r}")
        untied = TransformerConfig(**{**cfg.__dict__, "tie_word_embeddings": False})
        super().__init__(untied, spec, layers=range(trunk_layers, cfg.num_layers), embedding=trunk_layers == 0,
                         lm_head=kind == "lm")
        self.score = nn.Linear(cfg.hidden_size, num_outputs, bias=False) if kind == "scalar" else None


class RoleOutput(NamedTuple):
    """Per-token results, (B, S); None where the role was not run or no targets were given. A NamedTuple,
    so wrappers that walk outputs (FSDP2's backward hooks) find the tensors."""

    logp: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_argmax: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    kl: torch.Tensor | None = None  # exact KL(policy || reference), when both ran
    values: torch.Tensor | None = None  # critic
    rewards: torch.Tensor | None = None  # reward model score at every position (read the last one)
    trunk_states: torch.Tensor | None = None  # (B, S, D) boundary states, None for k = 0


@dataclass
class TrunkCache:
    """Boundary states of a rollout batch kept across PPO epochs (optionally bf16, optionally on CPU)."""

    states: torch.Tensor  # (B, S, D)
    compute_dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()

    @classmethod
    def keep(cls, states: torch.Tensor, *, store_dtype: torch.dtype | None = None, offload: bool = False) -> "TrunkCache":
        """Keep boundary states already computed (e.g. ``RoleOutput.trunk_states`` of the experience pass)."""
        compute_dtype = states.dtype
        states = states.detach().to(dtype=store_dtype or compute_dtype, device="cpu" if offload else states.device)
        if offload and torch.cuda.is_available():
            states = states.pin_memory()
        return cls(states, compute_dtype)

    def get(self, device: torch.device | str, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        states = self.states if rows is None else self.states[rows]
        return states.to(device=device, dtype=self.compute_dtype, non_blocking=True)


class RoleModel(nn.Module):
    """The frozen trunk and the four role heads, run together (see the module docstring)."""

    def __init__(self, cfg: TransformerConfig, trunk_layers: int, spec: LayerSpec = LayerSpec(),
                 roles: Iterable[Role] = tuple(Role), lora: LoRAConfig | None = None) -> None:
        """``roles``: the heads to build (DPO needs only policy and reference; PPO all four). ``lora``
        with rank > 0: adapters on the policy and critic heads, and the reference is the policy head
        with its adapters off (no head of its own). Adapters are created uninitialised on the meta
        device; ``from_sft`` initialises them."""
        super().__init__()
        self.lora = lora if lora is not None and lora.rank > 0 else None
        if not 0 <= trunk_layers < cfg.num_layers:
            raise ValueError(f"trunk_layers={trunk_layers} must be in [0, num_layers={cfg.num_layers})")
        self.config = cfg
        self.trunk_layers = trunk_layers
        self.roles = tuple(r for r in Role if r in set(roles))
        self.trunk = None
        if trunk_layers > 0:  # embedding + layers [0, k), no final norm and no head
            self.trunk = Transformer(cfg, spec, layers=range(trunk_layers), final_norm=False, lm_head=False)
        self.heads = nn.ModuleDict({
            role.value: RoleHead(cfg, trunk_layers, "lm" if role in LM_ROLES else "scalar", spec) for role in self.roles
            if not (role is Role.REFERENCE and self.lora is not None)
        })
        if self.lora is not None:
            if Role.REFERENCE in self.roles and Role.POLICY not in self.roles:
                raise ValueError("with LoRA the reference is the policy head with its adapters off: build the policy too")
            for role in (Role.POLICY, Role.CRITIC):
                if role in self.roles:
                    apply_lora(self.head(role), self.lora)
        self.freeze()

    # ------------------------------------------------------------------------------------ building

    @classmethod
    def from_sft(
        cls,
        sft: Transformer,
        trunk_layers: int,
        *,
        reward: "Transformer | nn.Module | None" = None,
        reward_score: torch.Tensor | None = None,
        roles: Iterable[Role] = tuple(Role),
        lora: LoRAConfig | None = None,
        seed: int = 0,
    ) -> "RoleModel":
        """Roles initialised from an SFT model: trunk and policy/reference heads copy it; the reward head
        copies ``reward`` (a decoder of the same shape, or a ``ScoreModel`` whose score it takes) and
        ``reward_score`` (1, D), else the SFT layers and a zero score; the critic starts as a copy of the
        reward head (InstructGPT initialises the value function from the RM). Adapters (``lora``) start
        from ``seed``: A Kaiming-uniform, B zero."""
        with torch.device("meta"):
            model = cls(sft.config, trunk_layers, roles=roles, lora=lora)
        state = {}
        sft_state = sft.state_dict()
        if trunk_layers > 0:
            state.update({f"trunk.{k}": v for k, v in sft_state.items() if in_trunk(k, trunk_layers)})
        if hasattr(reward, "full_state_dict"):  # a ScoreModel: decoder names plus score.weight
            rm_state = reward.full_state_dict()
            if reward_score is None:
                reward_score = rm_state["score.weight"][:1]
        else:
            rm_state = (reward if reward is not None else sft).state_dict()
        generator = torch.Generator().manual_seed(seed)
        for role in model.roles:
            if role.value not in model.heads:  # the reference with LoRA: the policy head itself
                continue
            src = sft_state if role in LM_ROLES else rm_state
            head = model.heads[role.value]
            for name, value in head.state_dict().items():
                key = f"heads.{role.value}.{name}"
                if is_adapter(name):
                    state[key] = fresh_adapter(name, value.shape, generator)
                elif name == "lm_head.weight":
                    state[key] = sft.output_weight.detach()
                elif name == "score.weight":
                    state[key] = reward_score if reward_score is not None else torch.zeros(1, sft.config.hidden_size)
                else:
                    state[key] = src[name]
        model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
        model.freeze()
        return model

    def freeze(self) -> None:
        """Trunk, reference and reward never train: no gradients, so no optimizer state either. With
        LoRA, the policy and critic heads train only their adapters (and ``lora.trainable``, the score)."""
        if self.trunk is not None:
            self.trunk.requires_grad_(False)
        for name, head in self.heads.items():
            head.requires_grad_(TRAINABLE[Role(name)])
            if self.lora is not None and TRAINABLE[Role(name)]:
                freeze_base(head, self.lora)

    def head(self, role: Role) -> RoleHead:
        """The head a role runs: with LoRA, the reference runs the policy head (adapters off)."""
        if role is Role.REFERENCE and self.lora is not None:
            role = Role.POLICY
        return self.heads[role.value]

    def trainable_parameters(self, roles: Iterable[Role] = (Role.POLICY, Role.CRITIC)) -> list[nn.Parameter]:
        return [p for r in roles for p in self.head(r).parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------ running

    @torch.no_grad()
    def encode_trunk(
        self,
        input_ids: torch.Tensor,
        *,
        document_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        store_dtype: torch.dtype | None = None,
        offload: bool = False,
    ) -> TrunkCache:
        """Run the trunk once and keep its boundary states (B, S, D) for reuse across PPO epochs."""
        if self.trunk is None:
            raise ValueError("trunk_layers = 0: there is no shared trunk to cache")
        states = self.trunk(input_ids, document_ids=document_ids, positions=positions)
        return TrunkCache.keep(states, store_dtype=store_dtype, offload=offload)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, S) tokens
        *,
        roles: Iterable[Role] | None = None,  # default: every head this model has
        document_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,  # (B, S) next tokens for log-probs, -100 where ignored
        trunk_states: torch.Tensor | None = None,  # cached boundary states: skip the trunk
        temperature: float = 1.0,
    ) -> RoleOutput:
        if document_ids is None and positions is None:  # the heads see states, not tokens: give the length
            B, S = input_ids.shape[:2]
            positions = torch.arange(S, device=input_ids.device).expand(B, S)
        cached = trunk_states is not None
        return self.stage_forward(trunk_states if cached else input_ids, range(self.entry_layer(cached), self.config.num_layers),
                                  first=not cached, last=True, roles=roles, document_ids=document_ids,
                                  positions=positions, targets=targets, temperature=temperature)

    def entry_layer(self, cached_trunk: bool) -> int:
        """The first layer a forward runs: k when the trunk's boundary states are given, else 0."""
        return self.trunk_layers if cached_trunk else 0

    def stage_forward(
        self,
        x: "torch.Tensor | dict[str, torch.Tensor]",  # tokens (first), trunk states (B, S, D), or role -> head states
        layers: Sequence[int],  # global layer indices this stage runs
        *,
        first: bool,
        last: bool,
        roles: Iterable[Role] | None = None,
        document_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> "RoleOutput | torch.Tensor | dict[str, torch.Tensor]":
        """Layers ``layers`` of the trunk (i < k, no graph) and of every requested head (i >= k, each head
        with a graph if it trains); the embedding if ``first``, the final norms and outputs if ``last``.
        ``forward`` is this over all layers; a pipeline stage (``parallel/pipeline.py``) runs a slice
        and hands on the trunk's states, or one tensor per head once the heads have begun."""
        roles = self._requested(roles)
        k = self.trunk_layers
        out: dict[str, torch.Tensor | None] = {}
        if first:
            if self.trunk is not None:
                with torch.no_grad():
                    x = self.trunk.embed(x)  # (B, S, D)
            else:  # k = 0: every head starts from the tokens with its own embedding
                x = {r.value: self._in_mode(r, self.head(r).embed, x) for r in roles}
        part = self.trunk if self.trunk is not None else self.head(roles[0])
        ctx = part.layer_context(x if torch.is_tensor(x) else next(iter(x.values())), positions=positions,
                                 document_ids=document_ids)
        trunk_part, head_part = [i for i in layers if i < k], [i for i in layers if i >= k]
        if trunk_part:
            with torch.no_grad():  # frozen: no graph, no backward through the trunk
                x = self.trunk.run_layers(x, ctx, trunk_part)
        if torch.is_tensor(x) and (head_part or last):  # the trunk ends here: every head starts from its states
            out["trunk_states"] = x
            x = {r.value: x for r in roles}
        if head_part:
            # A fixed order, not the set's: under TP/FSDP every rank must issue the heads' collectives in the
            # same sequence, and a set of enums iterates in a per-process (hash-seeded) order.
            x = {r.value: self._in_mode(r, self.head(r).run_layers, x[r.value], ctx, head_part) for r in roles}
        if not last:
            return x
        hidden = {r: self._in_mode(r, self.head(r).norm, x[r.value]) for r in roles}  # (B, S, D) each
        if targets is not None and (Role.POLICY in roles or Role.REFERENCE in roles):
            out.update(self._logprobs(hidden, targets, temperature))
        for role, name in ((Role.CRITIC, "values"), (Role.REWARD, "rewards")):
            if role in roles:
                out[name] = self.head(role).score(hidden[role]).squeeze(-1).float()  # (B, S)
        return RoleOutput(**out)

    def _requested(self, roles: Iterable[Role] | None) -> tuple[Role, ...]:
        roles = set(self.roles if roles is None else roles)
        if roles - set(self.roles):
            raise ValueError(f"roles {sorted(r.value for r in roles - set(self.roles))} were not built")
        return tuple(r for r in Role if r in roles)

    def _in_mode(self, role: Role, fn, *args):
        """``fn(*args)`` with a graph only for a trainable role; the LoRA reference with adapters off."""
        shared = role is Role.REFERENCE and self.lora is not None
        with torch.enable_grad() if TRAINABLE[role] else torch.no_grad(), \
                adapters_disabled(self.head(role)) if shared else contextlib.nullcontext():
            return fn(*args)

    def _logprobs(self, hidden, targets, temperature) -> dict[str, torch.Tensor | None]:
        ref_hidden = ref_weight = None
        if Role.REFERENCE in hidden:
            ref_weight, ref_offset, ref_group = local_vocab_shard(self.head(Role.REFERENCE).lm_head.weight)
            ref_hidden, ref_weight = hidden[Role.REFERENCE], ref_weight.detach()
        if Role.POLICY in hidden:
            w, offset, group = local_vocab_shard(self.head(Role.POLICY).output_weight)  # LoRA: W + s B A
            res = linear_logprob(hidden[Role.POLICY], w, targets, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                 temperature=temperature, tp_group=group, vocab_offset=offset,
                                 softcap=self.config.final_logit_softcapping)
        else:
            res = linear_logprob(None, None, targets, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                 temperature=temperature, tp_group=ref_group, vocab_offset=ref_offset,
                                 softcap=self.config.final_logit_softcapping)
        return {"logp": res.logp, "entropy": res.entropy, "is_argmax": res.is_argmax, "ref_logp": res.ref_logp,
                "kl": res.kl}

    # ------------------------------------------------------------------------------------ decoding

    def decode(self, input_ids, *, positions, document_ids, kv_cache: KVCache, record: list | None = None):
        """One generation step through trunk + policy head, one KV cache over all L layers (the head, which
        ends the decoder, commits the step); returns the policy's final hidden states and appends the
        trunk's boundary states for these tokens to ``record``."""
        x = input_ids
        if self.trunk is not None:
            x = self.trunk(input_ids, positions=positions, document_ids=document_ids, kv_cache=kv_cache)
            if record is not None:
                record.append(x)
        return self.head(Role.POLICY)(x, positions=positions, document_ids=document_ids, kv_cache=kv_cache)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.head(Role.POLICY).output_weight

    def policy_model(self) -> Transformer:
        """Trunk + policy head as one plain ``Transformer`` (untied), e.g. for a Hugging Face export."""
        cfg = TransformerConfig(**{**self.config.__dict__, "tie_word_embeddings": False})
        with torch.device("meta"):
            full = Transformer(cfg)
        state = {}
        if self.trunk is not None:
            state.update({k: v for k, v in self.trunk.state_dict().items()})
        state.update(self.head(Role.POLICY).state_dict())
        if self.lora is not None:  # adapters merged: W + (alpha / r) B A
            state = merge_lora_state(state, self.lora.alpha / self.lora.rank)
        full.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
        return full


@torch.no_grad()
def measure_sharing(
    model: RoleModel,
    input_ids: torch.Tensor,  # (B, S) a batch of the run's own sequences (e.g. its last rollout)
    *,
    document_ids: torch.Tensor | None = None,  # (B, S)
    targets: torch.Tensor | None = None,  # (B, S) next tokens, -100 where ignored
    repeats: int = 3,
) -> dict[str, float]:
    """What one shared frozen trunk saves against separate models, measured on ``model`` itself.

    Memory, in MiB of the tensors as held: the weights (the trunk once plus every head, against one trunk
    per head: separate models of the same shape) and, without LoRA, the training state of the trainable
    roles (policy, critic): a gradient per trainable weight and AdamW's two fp32 moments, for their heads
    here and for their whole models (trunk included) when separate. Time: one forward of every role on
    the batch over one trunk pass, against each role run alone (its own trunk pass, as a separate model's
    lower layers run), the median of ``repeats`` after a warm-up."""
    if model.trunk is None:
        raise ValueError("measure_sharing needs a shared trunk (trunk_layers > 0)")
    mib = lambda params: sum(p.numel() * p.element_size() for p in params) / 2**20  # noqa: E731
    trunk = mib(model.trunk.parameters())
    heads = {name: mib(head.parameters()) for name, head in model.heads.items()}
    out: dict[str, float] = {"trunk_layers": model.trunk_layers, "layers": model.config.num_layers,
                             "weights_mb": trunk + sum(heads.values()),
                             "weights_mb_separate": len(heads) * trunk + sum(heads.values())}
    if model.lora is None:
        roles = [r for r in (Role.POLICY, Role.CRITIC) if r.value in model.heads]  # GRPO has no critic
        trainable = model.trainable_parameters(roles)
        state = lambda mb, n: mb + 2 * n * 4 / 2**20  # noqa: E731  gradient + AdamW's fp32 moments
        n_heads = sum(p.numel() for p in trainable)
        n_trunk = sum(p.numel() for p in model.trunk.parameters())
        n_roles = len(roles)
        out["train_state_mb"] = state(mib(trainable), n_heads)
        out["train_state_mb_separate"] = state(mib(trainable) + n_roles * trunk, n_heads + n_roles * n_trunk)

    def timed(roles) -> float:
        times = []
        for _ in range(repeats + 1):  # the first warms up
            t0 = time.perf_counter()
            for group in roles:
                model(input_ids, roles=group, document_ids=document_ids, targets=targets)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:]) * 1e3

    out["experience_ms"] = timed([model.roles])
    out["experience_ms_separate"] = timed([[r] for r in model.roles])
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def in_trunk(name: str, k: int) -> bool:
    """Whether a decoder parameter (our names) belongs to the frozen trunk of k layers."""
    if name.startswith("embed_tokens."):
        return True
    if name.startswith("layers."):
        return int(name.split(".")[1]) < k
    return False


# ---------------------------------------------------------------------------------------------- checkpoints

ROLES_META = "roles.json"


def save_roles(model: RoleModel, path: str | os.PathLike) -> Path:
    """``trunk.safetensors`` once, ``heads/<role>.safetensors`` per role and ``roles.json``, written into a
    temporary directory renamed into place (an existing ``path`` is replaced only when complete)."""
    with atomic_directory(Path(path)) as tmp:
        meta = {"trunk_layers": model.trunk_layers, "roles": [r.value for r in model.roles],
                "config": TypeAdapter(TransformerConfig).dump_python(model.config, mode="json"),
                "lora": TypeAdapter(LoRAConfig).dump_python(model.lora, mode="json") if model.lora else None}
        (tmp / ROLES_META).write_text(json.dumps(meta, indent=2))
        if model.trunk is not None:
            save_file(_plain_state(model.trunk), str(tmp / "trunk.safetensors"))
        (tmp / "heads").mkdir()
        for role in model.heads:
            save_file(_plain_state(model.heads[role]), str(tmp / "heads" / f"{role}.safetensors"))
    return Path(path)


def load_roles(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> RoleModel:
    path = Path(path)
    meta = json.loads((path / ROLES_META).read_text())
    cfg = TypeAdapter(TransformerConfig).validate_python(meta["config"])
    lora = TypeAdapter(LoRAConfig).validate_python(meta["lora"]) if meta.get("lora") else None
    with torch.device("meta"):
        model = RoleModel(cfg, meta["trunk_layers"], roles=[Role(r) for r in meta.get("roles", [r.value for r in Role])],
                          lora=lora)
    state = {}
    if model.trunk is not None:
        state.update({f"trunk.{k}": v for k, v in load_file(str(path / "trunk.safetensors"), device=str(device)).items()})
    for role in model.heads:
        head = load_file(str(path / "heads" / f"{role}.safetensors"), device=str(device))
        state.update({f"heads.{role}.{k}": v for k, v in head.items()})
    model.load_state_dict(state, strict=True, assign=True)
    model.freeze()
    return model


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
