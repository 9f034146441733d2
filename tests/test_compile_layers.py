"""parallel.compile_layers: each decoder layer through torch.compile (parallel/compile.py). Training with
compiled layers computes what eager layers compute (the oracle: the same run with eager layers), under
torchao FP8 too; generation runs the compiled layers eagerly and compiles nothing."""

import copy

import pytest
import torch

from rlhf_engine.config import FP8Config, load_config
from rlhf_engine.models import RoleModel, Transformer, TransformerConfig
from rlhf_engine.parallel.compile import compile_decoder_layers, wants_compiled_layers
from rlhf_engine.rollout import generate

TINY = ["model.architecture.hidden_size=64", "model.architecture.intermediate_size=192", "model.architecture.num_layers=2",
        "data.builtin_rows=200", "trainer.max_steps=8", "trainer.eval_every=0", "logging.progress_bar=false",
        "logging.log_every=4", "trainer.resume=never"]


def test_compile_layers_defaults_on_for_torchao_fp8_on_cuda_only():
    fp8 = FP8Config(backend="torchao")
    assert wants_compiled_layers(None, fp8, "cuda") and not wants_compiled_layers(None, fp8, "cpu")
    assert not wants_compiled_layers(None, None, "cuda")
    assert not wants_compiled_layers(False, fp8, "cuda") and wants_compiled_layers(True, None, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "bf16+torchao_fp8"])
def test_sft_with_compiled_layers_matches_eager_layers(tmp_path, fp8):
    if fp8:
        pytest.importorskip("torchao")
    from rlhf_engine.stages.sft import run_sft

    extra = ["precision.dtype=bfloat16"] + (["precision.fp8.backend=torchao"] if fp8 else [])
    eager = run_sft(load_config("configs/sft_tiny.yaml", TINY + extra + [f"trainer.out_dir={tmp_path / 'eager'}"]))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = run_sft(load_config("configs/sft_tiny.yaml", TINY + extra + [
        f"trainer.out_dir={tmp_path / 'compiled'}", "parallel.compile_layers=true",
        f"model.tokenizer_path={tmp_path / 'eager' / 'tokenizer'}"]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the layers did run compiled
    # same data, same initial weights: the losses differ only by inductor's fused reduction order in bf16
    assert compiled["eval_loss_initial"] == pytest.approx(eager["eval_loss_initial"], rel=2e-3)
    assert compiled["eval_loss_final"] == pytest.approx(eager["eval_loss_final"], rel=1e-2)


def test_generation_runs_compiled_layers_eagerly():
    """Generation's prompt passes run under force_eager: a new prompt length compiles nothing, and the
    tokens and log-probs equal those of the uncompiled model."""
    cfg = TransformerConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, max_position_embeddings=64)
    model = Transformer(cfg)
    model.reset_parameters(torch.Generator().manual_seed(0))
    plain = RoleModel.from_sft(copy.deepcopy(model), 1)
    roles = RoleModel.from_sft(model, 1)
    compile_decoder_layers(roles)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    roles(torch.randint(0, 96, (2, 7)))  # the training-side call compiles
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1
    kw = dict(max_new_tokens=6, stop_ids=[], pad_id=0, temperature=1.0)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    got = generate(roles, prompts, **kw, generator=torch.Generator().manual_seed(1))
    want = generate(plain, prompts, **kw, generator=torch.Generator().manual_seed(1))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert got.responses == want.responses
    assert max(abs(a - b) for x, y in zip(got.logprobs, want.logprobs) for a, b in zip(x, y)) <= 1e-5


@pytest.mark.slow
def test_grpo_with_compiled_layers_matches_eager_layers(tmp_path):
    """An RL run with compiled layers: training and the reference pass compiled, generation eager. In fp32
    the compiled layers equal the eager ones to rounding, so the run samples the same first rollouts and
    learns as the eager run does."""
    import json

    from test_rl_stage import _config  # beside this file (pytest puts tests/ on the path)

    from rlhf_engine.stages.rl import run_rl

    runs = {}
    for name, extra in (("eager", []), ("compiled", ["parallel.compile_layers=true"])):
        (tmp_path / name).mkdir()
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        runs[name] = run_rl(_config(tmp_path / name, "grpo", "trainer.max_steps=6", *extra))
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs >= 1 if extra else graphs == 0  # compiled: the training and reference passes
    rewards = {name: [r["rollout/reward"] for r in map(json.loads, (tmp_path / name / "grpo" / "metrics.jsonl")
                                                         .read_text().splitlines()) if "rollout/reward" in r]
               for name in runs}
    assert rewards["compiled"][0] == pytest.approx(rewards["eager"][0], abs=1e-6)  # the same first rollout
    assert runs["compiled"]["eval_reward_final"] == pytest.approx(runs["eager"]["eval_reward_final"], abs=0.05)
