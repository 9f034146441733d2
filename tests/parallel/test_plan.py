"""The dry run: 175B counts against a table computed by hand, closed-form shard formulas against the
real TP/FSDP plans on meta tensors, bad layouts refused before allocation, the CLI's JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
    # Cost-balanced split: a frozen trunk layer is 1 forward, a head layer 3 + 1 + 3 + 1 over the four
    # heads, so the trunk stages take 35 layers and the head stages 4; work within 6% of the mean.
    assert [s["layers"] for s in p["stages"]] == [[0, 35], [35, 70], [70, 76], [76, 80], [80, 84], [84, 88],
                                                  [88, 92], [92, 96]]
    assert s0["holders"]["trunk"]["params"] == EMBED_PER_RANK + 35 * LAYER_PER_RANK  # embedding + 35 layers
    assert s0["holders"]["policy"]["params"] == 0  # the trunk fills the first stages
    assert p["flops_imbalance"] < 0.07 and p["warnings"] == []
    lm_head = H // DP + V // (TP * DP) * H
    assert s7["holders"]["policy"]["params"] == 4 * LAYER_PER_RANK + lm_head
    policy = s7["holders"]["policy"]["bytes"]
    assert policy == {"params": 4 * s7["holders"]["policy"]["params"], "grads": 4 * s7["holders"]["policy"]["params"],
                      "optimizer": 8 * s7["holders"]["policy"]["params"]}
    assert s7["holders"]["reference"]["bytes"]["grads"] == 0  # frozen: bf16 weights only
    assert p["roles"]["trunk"]["params_total"] == V * H + 72 * LAYER
    assert p["fits"] and p["max_rank_bytes"] == max(s["peak_bytes"] for s in p["stages"])


def test_gpt3_175b_rl_iteration_flops_generation_memory_and_budget():
    """Generation on the policy gathered whole per rank (tp 8, pp folded into dp), the experience pass over
    four heads, the update of two heads from cached trunk states: numbers by hand."""
    p = plan(load_config(RECIPE), world_size=1024)
    rl = p["rl"]
    f = 2 * (4 * H * H + 3 * H * FFN) + 2 * 2048 * H  # one layer's forward FLOPs per token at S = 2048
    lm = 2 * H * V
    tokens = 512 * 2048  # 512 prompts per rollout, at most seq_len each
    assert rl["flops_per_iteration"]["generation"] == pytest.approx(tokens * (96 * f + lm))
    assert rl["flops_per_iteration"]["experience"] == pytest.approx(tokens * (72 * f + 24 * 4 * f + 2 * lm))
    assert rl["flops_per_iteration"]["update"] == pytest.approx(tokens * (24 * 2 * 3 * f + 3 * lm))
    assert rl["generation_copy_bytes_per_rank"] == MODEL // TP * 2  # bf16 policy, tp-sharded
    assert rl["generation_kv_cache_bytes_per_rank"] == 2 * 96 * (512 // DP) * 2048 * H // TP * 2
    assert rl["iterations_for_instructgpt_episodes"] == 500
    total = 500 * sum(rl["flops_per_iteration"].values())
    assert rl["pfs_days_for_instructgpt_episodes"] == pytest.approx(total / (1e15 * 86400))
    s7 = p["stages"][7]
    assert s7["generation_bytes"] == s7["model_state_bytes"] + rl["generation_copy_bytes_per_rank"] \
        + rl["generation_kv_cache_bytes_per_rank"]


def test_plan_warns_when_pipeline_stages_are_imbalanced():
    p = plan(load_config(RECIPE, ["parallel.pp_first_stage_layers=8"]), world_size=1024)
    assert p["stages"][0]["layers"] == [0, 8] and p["flops_imbalance"] > 0.2
    assert "imbalanced" in p["warnings"][0] and "pp_first_stage_layers" in p["warnings"][0]
    # FLOPs per step: the stage's per-token cost x the tokens of a data-parallel rank's step, over tp
    s = p["stages"][0]
    tokens = 2048 * 1 * 16
    f = 2 * (4 * H * H + 3 * H * FFN) + 2 * 2048 * H  # one layer's forward per token
    assert s["flops_per_step"] == pytest.approx(8 * f * tokens / TP)


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


def test_cli_plan_json():
    out = subprocess.run([sys.executable, "-m", "rlhf_engine", "plan", "--config", str(RECIPE), "--world-size", "1024",
                          "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["model"]["params_per_model"] == MODEL and len(result["stages"]) == 8


# ---------------------------------------------------------------------------------------------- measured


def _state_bytes(model, optimizer) -> int:
    """Bytes of this rank's parameters, gradients and optimizer state (what the plan's model-state counts)."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    tensors = [local(p) for p in model.parameters()] + [local(p.grad) for p in model.parameters() if p.grad is not None]
    tensors += [local(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.ndim]
    return sum(t.numel() * t.element_size() for t in tensors)


def _memory_config(pp: int):
    from test_pipeline import ARCH, _config

    return _config({"architecture": {**ARCH, "num_layers": 8}, "trunk_layers": 4}, {"pp": pp}, {"grad_accum_steps": 2})


def _measure_body():
    """One RL update step (policy and critic heads) at pp = world size; each rank writes its state bytes."""
    import copy
    import json as _json
    import os

    from test_pipeline import _case

    from rlhf_engine.data.streams import StepTotals
    from rlhf_engine.parallel.runtime import init_runtime
    from rlhf_engine.trainer import build_optimizer, clip_model_grads, forward_backward

    cfg = _memory_config(int(os.environ.get("WORLD_SIZE", "1")))
    model, objective, make, _ = _case("rl", 8, trunk=4)
    oracle = copy.deepcopy(model)
    rt = init_runtime(cfg)
    model = rt.parallelize(model, cfg)
    optimizer = build_optimizer(model, cfg.optim)
    batches = make(2, 1, oracle)
    forward_backward(model, objective, batches, StepTotals.of(batches), train=True)
    clip_model_grads(model, 1.0)
    optimizer.step()  # Adam's moments now exist; the gradients are still held
    out = Path(os.environ["OUT"]) / f"bytes_pp{rt.dims.pp}_rank{rt.pp_rank}.json"
    out.write_text(_json.dumps(_state_bytes(model, optimizer)))


@pytest.mark.dist
def test_per_rank_memory_falls_with_pp_as_the_plan_predicts(tmp_path, monkeypatch):
    """An 8-layer RL role model (trunk 4) trained at pp = 1, 2, 4: each rank's parameter, gradient and Adam
    bytes are the plan's model-state bytes for its stage within 15%, and the busiest rank's fall with pp."""
    from torchrun_helper import torchrun

    monkeypatch.setenv("OUT", str(tmp_path))
    _measure_body()  # pp = 1, in this process
    for pp in (2, 4):
        torchrun(_measure_body, nproc=pp, env={"OUT": str(tmp_path)})
    busiest = {}
    for pp in (1, 2, 4):
        predicted = [s["model_state_bytes"] for s in plan(_memory_config(pp), world_size=pp)["stages"]]
        measured = [json.loads((tmp_path / f"bytes_pp{pp}_rank{r}.json").read_text()) for r in range(pp)]
        for got, want in zip(measured, predicted):
            assert abs(got - want) <= 0.15 * want, (pp, measured, predicted)
        busiest[pp] = max(measured)
    assert busiest[4] < busiest[2] < busiest[1], busiest
