"""Which layers each pipeline stage holds: a cost per layer and a balanced contiguous split.

    heads = heads_of(model)                                   # [Head("lm", trainable=True), ...]
    costs = layer_costs(cfg, trunk_layers=k, heads=heads, seq_len=S)
    split = balanced_split(costs, stages=4, first=None, last=None)   # [(lo, hi), ...] global layer ranges

The rule (documented in docs/architecture.md): a layer's cost is its forward FLOPs per token times the
passes it takes, summed over the branches that run it.
- A frozen trunk layer (i < k) runs once, forward only: cost 1 x f.
- A head layer (i >= k) runs once per head; a trainable head adds its backward (2 x forward): 3 x f for
  the policy or critic, 1 x f for the frozen reference or reward head. So with four heads a head layer
  costs 8 x f against the trunk's 1 x f, and the trunk's stages take many more layers.
- The last stage also pays the heads' outputs (2 D V per token for an LM head, times 3 when it trains).
- f = 2 x (the layer's parameters) + 2 S h d (causal attention's two matmuls at mean length S / 2).

The split is contiguous (stage s holds layers [lo_s, hi_s)) and minimises the largest stage cost by
dynamic programming over split points; every stage holds at least one layer, and of equally good
splits the one with lighter later stages wins (the last also holds the loss and the heads' outputs). ``first``/``last`` fix
the first and last stage's layer counts (Megatron's ``decoder_first/last_pipeline_num_layers``: leave
room for the embedding, or for the LM head's memory) and the rest is balanced over the middle stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..config.model import TransformerConfig
from .dims import LayoutError


@dataclass(frozen=True)
class Head:
    kind: str  # "lm" or "scalar"
    trainable: bool


def heads_of(model) -> list[Head]:
    """The output branches of a Transformer (one trainable LM head), ScoreModel or RoleModel."""
    if hasattr(model, "roles"):  # RoleModel
        from ..models.roles import LM_ROLES, TRAINABLE  # lazy: keeps this module importable without the models

        return [Head("lm" if r in LM_ROLES else "scalar", TRAINABLE[r]) for r in model.roles]
    if hasattr(model, "num_outputs"):  # ScoreModel
        return [Head("scalar", True)]
    return [Head("lm", True)]


def layer_flops(cfg: TransformerConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one decoder layer: 2 x parameters + causal attention 2 S h d."""
    D, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    params = D * (q + 2 * kv) + q * D + 3 * D * cfg.intermediate_size
    return 2.0 * params + 2.0 * seq_len * cfg.num_heads * d


def layer_costs(cfg: TransformerConfig, *, trunk_layers: int, heads: Sequence[Head], seq_len: int) -> tuple[list[float], float]:
    """(cost of each layer, cost of the outputs on the last stage), in FLOPs per token (module docstring)."""
    f = layer_flops(cfg, seq_len)
    head_passes = sum(3 if h.trainable else 1 for h in heads)
    costs = [f if i < trunk_layers else head_passes * f for i in range(cfg.num_layers)]
    output = sum((3 if h.trainable else 1) * 2.0 * cfg.hidden_size * (cfg.vocab_size if h.kind == "lm" else 1)
                 for h in heads)
    return costs, output


def balanced_split(costs: Sequence[float], stages: int, *, output_cost: float = 0.0, first: int | None = None,
                   last: int | None = None) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) layer ranges of ``stages`` stages minimising the largest stage cost."""
    L = len(costs)
    if L < stages:
        raise LayoutError(f"{L} layers cannot fill {stages} pipeline stages (pp x pp_stages_per_rank): every stage "
                          f"needs a layer; lower parallel.pp or pp_stages_per_rank to at most {L} stages")
    lo, hi, inner = 0, L, stages
    head: list[tuple[int, int]] = []
    tail: list[tuple[int, int]] = []
    for count, name in ((first, "pp_first_stage_layers"), (last, "pp_last_stage_layers")):
        if count is not None and count < 1:
            raise LayoutError(f"parallel.{name}={count} must be >= 1")
    if first is not None:
        head, lo, inner = [(0, first)], first, inner - 1
    if last is not None and stages > 1:
        tail, hi, inner = [(L - last, L)], L - last, inner - 1
    if hi - lo < inner or (inner == 0 and hi != lo):
        raise LayoutError(f"pp_first_stage_layers={first}, pp_last_stage_layers={last} leave {hi - lo} layers for "
                          f"{inner} middle stages of {stages}; each stage needs at least one layer and all {L} must be used")
    middle = _min_max_split(list(costs[lo:hi]), inner, output_cost if not tail else 0.0, offset=lo)
    return head + middle + tail


def _min_max_split(costs: list[float], stages: int, output_cost: float, offset: int) -> list[tuple[int, int]]:
    """Dynamic programme: best[s][j] = least possible max cost splitting the first j layers into s stages."""
    if stages == 0:
        return []
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, n - (stages - s) + 1):
            extra = output_cost if (s == stages and j == n) else 0.0
            for i in range(j - 1, s - 2, -1):  # on a tie the later cut: lighter later stages
                value = max(best[s - 1][i], prefix[j] - prefix[i] + extra)
                if value < best[s][j] - 1e-9 * abs(value):
                    best[s][j], cut[s][j] = value, i
    ranges, j = [], n
    for s in range(stages, 0, -1):
        i = cut[s][j]
        ranges.append((offset + i, offset + j))
        j = i
    return ranges[::-1]


def stage_costs(ranges: Sequence[tuple[int, int]], costs: Sequence[float], output_cost: float) -> list[float]:
    """Each stage's cost (FLOPs per token) under ``ranges``."""
    out = [sum(costs[lo:hi]) for lo, hi in ranges]
    out[-1] += output_cost
    return out


def imbalance(values: Sequence[float]) -> float:
    """max / mean - 1: 0 for perfectly balanced stages; > 0.2 is warned about by ``plan``."""
    mean = sum(values) / len(values)
    return max(values) / mean - 1 if mean else 0.0
