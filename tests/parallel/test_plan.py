"""The dry run: 175B counts against a table computed by hand, closed-form shard formulas against the
real TP/FSDP plans on meta tensors, bad layouts refused before allocation, the CLI under a minute."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from rlhf_engine.config import load_config
from rlhf_engine.models import TransformerConfig
from rlhf_engine.parallel import LayoutError, ParallelDims
from rlhf_engine.parallel.plan import exact_shards, formula_shards, plan

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs/gpt3_175b_ppo.yaml"

# GPT-3 175B shape as configured: h = 12288, 96 layers, 96 heads (MHA), FFN 32768, vocabulary 51200.
H, FFN, V, LAYERS = 12288, 32768, 51200, 96
LAYER = 4 * H * H + 3 * H * FFN + 2 * H  # q, k, v, o + gate, up, down + two norms = 1,811,963,904
assert LAYER == 1_811_963_904
MODEL = V * H + LAYERS * LAYER + (H + V * H)  # embedding + layers + (final norm + LM head)
TP, DP = 8, 16  # 1024 = 8 (pp) x 16 (dp) x 8 (tp)
LAYER_PER_RANK = (4 * H * H + 3 * H * FFN) // (TP * DP) + 2 * H // DP  # norms: replicated over tp
EMBED_PER_RANK = V // (TP * DP) * H


def test_gpt3_175b_counts_match_hand_table():
    p = plan(load_config(RECIPE), world_size=1024)
    assert p["model"]["params_per_model"] == MODEL == 175_206_838_272
    assert p["component_params"] == {"embedding": V * H, "layer": LAYER, "lm_head": H + V * H, "scalar_head": 2 * H}
    assert p["component_shards_per_rank"]["layer"] == LAYER_PER_RANK == 14_157_312
    assert p["component_shards_per_rank"]["embedding"] == EMBED_PER_RANK == 4_915_200
    assert p["layout"] == {"dp_replicate": 1, "dp_shard": 16, "pp": 8, "tp": 8, "sequence_parallel": True,
                           "activation_checkpointing": True}
    s0, s7 = p["stages"][0], p["stages"][7]
    assert s0["holders"]["trunk"]["params"] == EMBED_PER_RANK + 12 * LAYER_PER_RANK  # embedding + 12 layers
    assert s0["holders"]["policy"]["params"] == 0  # the trunk fills the first 6 stages (72 layers)
    lm_head = H // DP + V // (TP * DP) * H
    assert s7["holders"]["policy"]["params"] == 12 * LAYER_PER_RANK + lm_head
    policy = s7["holders"]["policy"]["bytes"]
    assert policy == {"params": 4 * s7["holders"]["policy"]["params"], "grads": 4 * s7["holders"]["policy"]["params"],
                      "optimizer": 8 * s7["holders"]["policy"]["params"]}
    assert s7["holders"]["reference"]["bytes"]["grads"] == 0  # frozen: bf16 weights only
    assert p["roles"]["trunk"]["params_total"] == V * H + 72 * LAYER
    assert p["fits"] and p["max_rank_bytes"] == max(s["total_bytes"] for s in p["stages"])


SMALL = [  # (architecture overrides, dp_shard, tp): GQA, biases, uneven FSDP splits
    (dict(num_heads=8, num_kv_heads=2), 3, 2),
    (dict(num_heads=4, num_kv_heads=4, qkv_bias=True, o_bias=True, mlp_bias=True), 2, 4),
    (dict(num_heads=6, num_kv_heads=3, qkv_bias=True), 5, 3),
]


@pytest.mark.parametrize("arch, dp, tp", SMALL)
def test_formulas_equal_exact_shards(arch, dp, tp):
    cfg = TransformerConfig(vocab_size=120, hidden_size=48, intermediate_size=96, num_layers=2, **arch)
    dims = ParallelDims(dp_replicate=1, dp_shard=dp, pp=1, tp=tp, world_size=dp * tp)
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=dp * tp)
    try:
        exact = exact_shards(cfg, dims, sequence_parallel=True)
    finally:
        dist.destroy_process_group()
    assert exact == formula_shards(cfg, dims)


def test_bad_layouts_fail_before_allocation():
    with pytest.raises(LayoutError, match=r"world size 1000 is not divisible by dp_replicate\*pp\*tp = 1\*8\*8 = 64"):
        plan(load_config(RECIPE), world_size=1000)
    with pytest.raises(LayoutError, match="num_heads=96 is not divisible by tp=7"):
        plan(load_config(RECIPE, ["parallel.tp=7"]), world_size=7 * 8 * 16)
    assert not dist.is_initialized()


def test_cli_plan_json_under_a_minute():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "rlhf_engine", "plan", "--config", str(RECIPE), "--world-size", "1024",
                          "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert time.perf_counter() - start < 60
    result = json.loads(out.stdout)
    assert result["model"]["params_per_model"] == MODEL and len(result["stages"]) == 8
