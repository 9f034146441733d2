"""Pipeline parallelism: a model cut into stages over the pipeline ranks, run by a schedule.

    split = plan_split(model, cfg, stages=pp * chunks)      # [(lo, hi), ...] balanced (stage_split.py)
    prune_to_stages(model, split, pp_rank, pp)              # drop what other ranks hold, names kept
    ... tensor parallel, activation checkpointing on the pruned model ...
    model = PipelinedModel(model, split, rt, schedule="1f1b", chunks=1)   # then FSDP over the data ranks
    loss, stats = model.run(passes, totals, train=True, loss_scale=dp)      # the trainer's forward-backward

**What a stage is.** Every model (``Transformer``, ``ScoreModel``, ``RoleModel``) has a
``stage_forward(x, layers, first=, last=)``: its own forward restricted to a slice of global layer
indices, the embedding on the first stage, the final norm and outputs (log-probs through the fused
kernel, scalar scores) on the last; ``forward`` is the same function over all layers. Stage s holds
layers [lo_s, hi_s) of the trunk *and* of every role head (the split is cost-balanced,
``stage_split.py``), on pipeline rank s mod pp (with ``chunks`` > 1 stages per rank, interleaved).
What travels between stages is the residual stream: one (B, S, D) tensor inside the trunk, one per
role head above it (a dict), (B, S / tp, D) under sequence parallelism.

**Why our own executor** and not ``torch.distributed.pipelining``: the trainer's passes differ from
micro-batch to micro-batch (packed rows of varying length, PPO-ptx's extra pass, DPO's two heads), a
carry may hold several tensors of which only the trainable heads' need gradients, a pass that starts
from cached trunk states enters at the stage holding layer k and skips the earlier ones entirely, and
frozen stages must run forward only. Each message therefore carries a small header (keys, shapes,
dtype, requires_grad) before its tensors, and a schedule is only an order of actions
(``schedules.py``).

**The step.** One micro-batch of the trainer is one or more ``ModelPass``es (``algorithms/objective.py``);
each pass is one pipeline micro-batch. Every pipeline rank of a data-parallel rank holds the same
passes (the same data), so all know each pass's shapes and entry stage without asking. The last stage
computes each pass's loss, already divided by the step's global totals, so gradient accumulation is a
sum as without pipelining; then:
- tied embeddings (``tie_word_embeddings``): the first stage holds the embedding and the last stage a
  copy of the same weight as its LM head; after backward their gradients are summed over the two
  (Megatron's embedding group), so both copies take identical optimizer steps and stay equal;
- the gradient norm is the global one: squared norms summed over the pipeline ranks (a tied weight
  counted once), so clipping matches one process;
- the loss and stats are broadcast from the last stage over the pipeline group, so every rank reports
  the same numbers and metrics are written once by rank 0.

Parameters keep their full-model names (the pruned model's children become this module's), so DCP
checkpoints move between pp = 1 and pp > 1, and ``full_state_dict`` gathers every stage to rank 0 for
a Hugging Face export.

Communication: gloo matches messages by tag; NCCL matches by order per pair of ranks, which the
interleaved schedule does not keep (a rank sends activations and gradients of different chunks to the
same peer), so interleaved_1f1b is refused on NCCL until its sends are paired as Megatron's are.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from ..algorithms.objective import ModelPass, merge_stats
from ..data.streams import StepTotals
from .dims import LayoutError
from .fsdp import decoder_parts
from .grads import grad_of, set_grad
from .schedules import check_schedule, forward_only_actions, schedule_actions
from .stage_split import balanced_split, heads_of, layer_costs

HEADER = 64  # int64 slots: [count, then per tensor: key, dtype, requires_grad, ndim, 4 dims]
CARRY_KEYS = ("x", "trunk", "policy", "reference", "critic", "reward")
WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MODEL_INPUTS = ("input_ids", "trunk_states")  # what enters a stage as its x, not as a keyword


def plan_split(model, *, stages: int, seq_len: int, first: int | None = None, last: int | None = None) -> list[tuple[int, int]]:
    """The cost-balanced layer ranges of ``stages`` stages for ``model`` (``stage_split.py``)."""
    costs, output = layer_costs(model.config, trunk_layers=getattr(model, "trunk_layers", 0), heads=heads_of(model),
                                seq_len=seq_len)
    return balanced_split(costs, stages, output_cost=output, first=first, last=last)


def prune_to_stages(model, split: Sequence[tuple[int, int]], pp_rank: int, pp: int) -> None:
    """Drop, in place, every layer and end piece that pipeline rank ``pp_rank`` does not hold. Names of
    what remains are unchanged. With tied embeddings the last stage keeps the embedding as its LM head."""
    mine = [s for s in range(len(split)) if s % pp == pp_rank]
    layers = {i for s in mine for i in range(*split[s])}
    first, last = 0 in mine, len(split) - 1 in mine
    tied = model.config.tie_word_embeddings and not hasattr(model, "trunk_layers")
    for part in decoder_parts(model):
        for index in [i for i in part.layers if int(i) not in layers]:
            del part.layers[index]
        if not first and not (tied and last):
            part.embed_tokens = None
        if not last:
            part.norm = None
            part.lm_head = None
            if getattr(part, "score", None) is not None:
                part.score = None


def carry_items(carry: "torch.Tensor | dict[str, torch.Tensor]") -> list[tuple[str, torch.Tensor]]:
    return [("x", carry)] if torch.is_tensor(carry) else list(carry.items())


class PipelinedModel(nn.Module):
    """This pipeline rank's stages of a model, and the executor that runs passes through all stages."""

    def __init__(self, model: nn.Module, split: Sequence[tuple[int, int]], *, pp_group, pp_rank: int, pp: int,
                 schedule: str, chunks: int, device: torch.device, embedding_group=None) -> None:
        super().__init__()
        for name, child in model.named_children():  # the wrapped model's children are ours, same names
            self.add_module(name, child)
        for name, buf in model.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in model._non_persistent_buffers_set)
        object.__setattr__(self, "wrapped", model)  # not a child: its parameters would be named twice
        self.config = model.config
        self.split = list(split)
        self.pp_group, self.pp_rank, self.pp, self.chunks = pp_group, pp_rank, pp, chunks
        self.schedule, self.device = schedule, device
        self.num_stages = len(self.split)
        self.stages = [c * pp + pp_rank for c in range(chunks)]
        self.embedding_group = embedding_group
        self.tied = embedding_group is not None
        if device.type == "cuda" and schedule == "interleaved_1f1b":
            raise LayoutError("interleaved_1f1b over NCCL is not supported yet (messages are matched by tag, which "
                              "NCCL ignores); use pp_schedule=1f1b or gpipe on GPUs")

    def __getattr__(self, name: str):
        """The wrapped model's own attributes (``trunk_layers``, ``num_outputs``, ``roles``...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "wrapped" not in self.__dict__:
                raise
            return getattr(self.__dict__["wrapped"], name)

    # ------------------------------------------------------------------------------------ one stage

    def forward(self, stage: int, x, *, entry_layer: int = 0, **inputs):
        """Stage ``stage``'s slice of the wrapped model's forward (called through this module, so FSDP's
        root hooks gather and free this rank's parameters)."""
        lo, hi = self.split[stage]
        return self.wrapped.stage_forward(x, range(max(lo, entry_layer), hi), first=lo == 0 and entry_layer == 0,
                                          last=stage == self.num_stages - 1, **inputs)

    def stage_of_layer(self, layer: int) -> int:
        return next(s for s, (lo, hi) in enumerate(self.split) if lo <= layer < hi)

    def _peer(self, stage: int) -> int:
        return stage % self.pp

    def _tag(self, stage: int, mb: int, kind: int) -> int:
        return (mb * self.num_stages + stage) * 4 + kind

    # ------------------------------------------------------------------------------------ messages

    def _send_carry(self, carry, stage: int, mb: int) -> list[torch.Tensor]:
        """Post stage ``stage``'s output to the next stage's rank; returns the tensors that need gradients."""
        items = carry_items(carry)
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[0] = len(items)
        for i, (key, t) in enumerate(items):
            if t.ndim > 4 or 1 + 8 * (i + 1) > HEADER:
                raise ValueError(f"pipeline carry too large to describe: {len(items)} tensors of ndim {t.ndim}")
            header[1 + 8 * i: 5 + 8 * i] = torch.tensor([CARRY_KEYS.index(key), WIRE_DTYPES.index(t.dtype),
                                                         int(t.requires_grad), t.ndim])
            header[5 + 8 * i: 5 + 8 * i + t.ndim] = torch.tensor(t.shape)
        dst = self._peer(stage + 1)
        self._isend(header.to(self.device), dst, self._tag(stage, mb, 0))
        for _, t in items:
            self._isend(t.detach().contiguous(), dst, self._tag(stage, mb, 1))
        return [t for _, t in items if t.requires_grad]

    def _recv_carry(self, stage: int, mb: int):
        """Receive stage ``stage - 1``'s output for micro-batch ``mb``: (carry, tensors needing gradients)."""
        src = self._peer(stage - 1)
        header = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        self._recv(header, src, self._tag(stage - 1, mb, 0))
        h = header.cpu().tolist()
        items = []
        for i in range(h[0]):
            key, dtype, grad, ndim = h[1 + 8 * i: 5 + 8 * i]
            t = torch.empty(h[5 + 8 * i: 5 + 8 * i + ndim], dtype=WIRE_DTYPES[dtype], device=self.device)
            self._recv(t, src, self._tag(stage - 1, mb, 1))
            items.append((CARRY_KEYS[key], t.requires_grad_(bool(grad))))
        carry = items[0][1] if [k for k, _ in items] == ["x"] else dict(items)
        return carry, [t for _, t in items if t.requires_grad]

    def _isend(self, t: torch.Tensor, peer: int, tag: int) -> None:
        self._pending.append((dist.isend(t, group=self.pp_group, group_dst=peer, tag=tag), t))

    def _recv(self, t: torch.Tensor, peer: int, tag: int) -> None:
        dist.recv(t, group=self.pp_group, group_src=peer, tag=tag)

    # ------------------------------------------------------------------------------------ the step

    def run(self, passes: Sequence[ModelPass], totals: StepTotals, *, train: bool, loss_scale: float = 1.0
            ) -> tuple[float, dict[str, float]]:
        """Forward (and, when ``train``, backward) every pass through the pipeline; returns the sum of the
        passes' losses and stat sums, the same on every pipeline rank (module docstring)."""
        M = len(passes)
        if train:
            check_schedule(self.schedule, pp=self.pp, chunks=self.chunks, microbatches=M)
            actions = schedule_actions(self.schedule, rank=self.pp_rank, pp=self.pp, chunks=self.chunks, microbatches=M)
        else:
            actions = forward_only_actions(rank=self.pp_rank, pp=self.pp, chunks=self.chunks, microbatches=M)
        self._pending: list[tuple[Any, torch.Tensor]] = []
        saved: dict[tuple[int, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        loss_sum, stats = 0.0, {}
        entries = [self._entry(p) for p in passes]
        with torch.enable_grad() if train else torch.no_grad():
            for a in actions:
                entry_layer, entry_stage = entries[a.mb]
                if a.stage < entry_stage:  # a pass from cached trunk states skips the stages before layer k
                    continue
                if a.kind == "F":
                    received, outputs, result = self._forward_action(a.stage, a.mb, passes[a.mb], entry_layer,
                                                                     entry_stage, totals, loss_scale, train)
                    if result is not None:
                        loss_sum += result[0]
                        merge_stats(stats, result[1])
                    if train:
                        saved[(a.stage, a.mb)] = (received, outputs)
                else:
                    self._backward_action(a.stage, a.mb, entry_stage, *saved.pop((a.stage, a.mb)))
        for work, _ in self._pending:
            work.wait()
        self._pending = []
        if train and self.tied:
            self._sum_tied_grads()
        if not train and hasattr(self, "reshard"):  # FSDP: a forward-only root keeps its gathered parameters
            self.reshard()
        return self._from_last_stage(loss_sum, stats)

    def _entry(self, p: ModelPass) -> tuple[int, int]:
        cached = p.inputs.get("trunk_states") is not None
        layer = self.wrapped.entry_layer(cached) if cached else 0
        return layer, self.stage_of_layer(layer)

    def _forward_action(self, stage, mb, p: ModelPass, entry_layer, entry_stage, totals, loss_scale, train):
        inputs = {k: v for k, v in p.inputs.items() if k not in MODEL_INPUTS}
        if inputs.get("positions") is None and inputs.get("document_ids") is None:
            B, S = p.inputs["input_ids"].shape[:2]  # later stages see states (S / tp under SP): give the length
            inputs["positions"] = torch.arange(S, device=self.device).expand(B, S)
        if stage == entry_stage:
            x, received = (p.inputs["trunk_states"] if entry_layer else p.inputs["input_ids"]), []
        else:
            x, received = self._recv_carry(stage, mb)
        out = self(stage, x, entry_layer=entry_layer, **inputs)
        if stage < self.num_stages - 1:
            return received, self._send_carry(out, stage, mb), None
        loss, stats = p.loss(out, totals)
        outputs = [loss * loss_scale] if train and loss.requires_grad else []
        return received, outputs, (float(loss.detach()), stats)

    def _backward_action(self, stage, mb, entry_stage, received, outputs) -> None:
        if stage == self.num_stages - 1:
            grads = None
        else:
            grads = [torch.empty_like(t) for t in outputs]
            for g in grads:
                self._recv(g, self._peer(stage + 1), self._tag(stage, mb, 2))
        if outputs:
            torch.autograd.backward(outputs, grads)
        if stage > entry_stage:
            for t in received:
                g = t.grad if t.grad is not None else torch.zeros_like(t)
                self._isend(g.contiguous(), self._peer(stage - 1), self._tag(stage - 1, mb, 2))

    def _from_last_stage(self, loss: float, stats: dict[str, float]) -> tuple[float, dict[str, float]]:
        box = [(loss, stats)]
        dist.broadcast_object_list(box, group=self.pp_group, group_src=(self.num_stages - 1) % self.pp)
        return box[0]

    # ------------------------------------------------------------------------------------ gradients

    def _tied_weight(self) -> torch.Tensor:
        return self.wrapped.embed_tokens.weight

    def _sum_tied_grads(self) -> None:
        """Embedding group: the first stage's embedding and the last stage's LM-head copy get the sum."""
        if self.embedding_group is False:  # this rank holds neither end
            return
        weight = self._tied_weight()
        grad = grad_of(weight)  # (the fp32 main_grad of a bf16 weight: parallel/grads.py)
        if isinstance(grad, DTensor):  # tensor parallel: the two copies' gradients in the weight's layout
            local = grad.redistribute(weight.device_mesh, weight.placements).to_local().contiguous()
            dist.all_reduce(local, group=self.embedding_group)
            set_grad(weight, DTensor.from_local(local, weight.device_mesh, weight.placements, run_check=False))
        else:
            dist.all_reduce(grad, group=self.embedding_group)

    def grad_norm_params(self) -> list[nn.Parameter]:
        """The parameters whose gradients count towards the global norm on this rank (a tied weight once:
        on the first stage)."""
        skip = self._tied_weight() if self.tied and 0 not in self.stages else None
        return [p for p in self.parameters() if grad_of(p) is not None and p is not skip]

    def reduce_squares(self, squares: float) -> float:
        """Sum of squared gradient norms over the pipeline ranks."""
        t = torch.tensor([squares], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.pp_group)
        return float(t)

    def infer(self, input_ids: torch.Tensor, **inputs):
        """Forward-only, one pass through the stages (the RL experience pass: policy and reference log-probs,
        values, rewards); the last stage's output on every pipeline rank."""
        captured = []

        def keep(out, totals):
            captured.append(out)
            return torch.zeros((), device=self.device), {}

        self.run([ModelPass({"input_ids": input_ids, **inputs}, keep)], StepTotals({}), train=False)
        box = [_to(captured[0], "cpu") if captured else None]
        dist.broadcast_object_list(box, group=self.pp_group, group_src=(self.num_stages - 1) % self.pp)
        return _to(box[0], self.device)

    def gather_state(self, keep) -> dict[str, torch.Tensor]:
        """Collective over every rank: the unsharded tensors whose names ``keep`` accepts, from every stage,
        on every rank (CPU). Each stage unshards its own (over its tensor and data ranks), then the
        pipeline ranks exchange them: moved by collectives, never through one rank or a disk."""
        local = {}
        for name, p in self.named_parameters():  # the same order on every rank of a stage
            if keep(name):
                full = p.full_tensor() if isinstance(p, DTensor) else p
                local[name] = full.detach().cpu()
        parts: list[Any] = [None] * self.pp
        dist.all_gather_object(parts, local, group=self.pp_group)
        merged: dict[str, torch.Tensor] = {}
        for part in parts:
            merged.update(part)
        return merged

    # ------------------------------------------------------------------------------------ export

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: every stage's unsharded state, gathered on global rank 0 (empty elsewhere)."""
        state = get_model_state_dict(self, options=StateDictOptions(full_state_dict=True))
        state = {k: v.detach().cpu() for k, v in state.items()}
        gathered = [None] * self.pp if dist.get_rank() == 0 else None
        if _is_stage_leader(self.pp_group):
            dist.gather_object(state, gathered, group=self.pp_group, group_dst=0)
        if dist.get_rank() != 0:
            return {}
        merged: dict[str, torch.Tensor] = {}
        for part in gathered:
            merged.update(part)
        return merged


def _to(out, device):
    """A model output (tensor, NamedTuple of tensors or None) on ``device``."""
    if out is None:
        return None
    if torch.is_tensor(out):
        return out.to(device)
    return type(out)(*(_to(t, device) for t in out))


def _is_stage_leader(pp_group) -> bool:
    """Whether this rank's pipeline group is global rank 0's (data and tensor rank 0 of every stage)."""
    return 0 in dist.get_process_group_ranks(pp_group)


def embedding_group(mesh, pp: int):
    """The process group that sums a tied embedding's gradients: {first stage, last stage} of this rank's
    data/tensor coordinate; False on ranks of the middle stages. Collective (every rank builds every group)."""
    if pp == 2:
        return mesh["pp"].get_group()
    ranks = mesh.mesh  # (pp, dp_replicate, dp_shard, tp) global ranks
    mine = False
    me = dist.get_rank()
    for coord in ranks[0].flatten().tolist():
        index = (ranks[0] == coord).nonzero()[0].tolist()
        pair = [coord, int(ranks[(-1, *index)])]
        group = dist.new_group(pair)
        if me in pair:
            mine = group
    return mine
