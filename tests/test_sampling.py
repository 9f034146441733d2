"""Generation: batched, left-padded decoding over the KV cache against transformers' own generate;
seeded sampling; the trunk + policy path with recorded trunk states; stop strings; TP2 equals TP1."""

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_engine.models import RoleModel, load_hf_model
from rlhf_engine.models.roles import Role
from rlhf_engine.rollout import generate, sample_next
from torchrun_helper import torchrun

HF_CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.2)


def _models(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**HF_CFG)).eval()
    hf.save_pretrained(tmp_path)
    return hf, load_hf_model(tmp_path).eval()


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 61, (n,), generator=g).tolist() for n in (3, 9, 6)]


def test_greedy_batch_matches_transformers_generate(tmp_path):
    hf, ours = _models(tmp_path)
    stop = 2
    gen = generate(ours, _prompts(), max_new_tokens=12, stop_ids=[stop], pad_id=0, temperature=0.0)
    for prompt, out, reason in zip(_prompts(), gen.responses, gen.finish_reasons):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=stop,
                           pad_token_id=0)[0, len(prompt):].tolist()
        if stop in want:
            want = want[: want.index(stop) + 1]
        assert out == want
        assert reason == ("stop" if out[-1] == stop else "length")


def test_sampled_logprobs_match_a_scoring_forward_and_seeds_repeat(tmp_path):
    _, ours = _models(tmp_path)

    def sample(seed):
        return generate(ours, _prompts(), max_new_tokens=10, stop_ids=[2], pad_id=0, temperature=0.8, top_k=20,
                        generator=torch.Generator().manual_seed(seed))

    a, b, c = sample(7), sample(7), sample(8)
    assert a.responses == b.responses and a.responses != c.responses
    # the returned log-probs are those of the sampling distribution, softmax(logits / T)
    seq, docs, P = a.sequences, a.document_ids, a.prompt_length
    targets = torch.full_like(seq, -100)
    targets[:, P - 1 : -1] = torch.where(docs[:, P:] == 0, seq[:, P:], -100)
    with torch.no_grad():
        lp = ours(seq, document_ids=docs, targets=targets, temperature=0.8).logp
    for b_, resp in enumerate(a.responses):
        got = torch.tensor(a.logprobs[b_])
        assert torch.allclose(got, lp[b_, P - 1 : P - 1 + len(resp)], atol=1e-5)


@pytest.mark.parametrize("k", [0, 2])
def test_trunk_and_policy_decode_like_the_full_model_and_record_trunk_states(tmp_path, k):
    _, ours = _models(tmp_path)
    roles = RoleModel.from_sft(ours, k)
    full = generate(ours, _prompts(), max_new_tokens=8, stop_ids=[2], pad_id=0, temperature=0.0)
    split = generate(roles, _prompts(), max_new_tokens=8, stop_ids=[2], pad_id=0, temperature=0.0, record_trunk=True)
    assert split.responses == full.responses
    if k == 0:
        assert split.trunk_states is None
        return
    with torch.no_grad():  # recorded while decoding == one full trunk forward, on every real token
        states = roles.encode_trunk(split.sequences, document_ids=split.document_ids).states
    real = split.document_ids == 0
    assert split.trunk_states.shape == states.shape
    assert (split.trunk_states - states)[real].abs().max() <= 1e-5


@pytest.mark.parametrize("sync_every", [3, 8])
def test_finish_checks_every_few_steps_give_the_same_generation(tmp_path, sync_every):
    """Checking on the host only every few steps (as on a GPU, without a sync per token) decodes padding
    for rows that finished meanwhile and cuts those columns: the generation is unchanged, trunk states too."""
    _, ours = _models(tmp_path)
    roles = RoleModel.from_sft(ours, 2)
    kw = dict(max_new_tokens=20, stop_ids=list(range(2, 14)), pad_id=0, temperature=1.0, record_trunk=True)
    a = generate(roles, _prompts(), **kw, generator=torch.Generator().manual_seed(3), sync_every=1)
    b = generate(roles, _prompts(), **kw, generator=torch.Generator().manual_seed(3), sync_every=sync_every)
    assert set(a.finish_reasons) == {"stop"} and len(set(map(len, a.responses))) > 1  # rows end at different steps
    assert (a.responses, a.logprobs, a.finish_reasons) == (b.responses, b.logprobs, b.finish_reasons)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.document_ids, b.document_ids)
    assert torch.equal(a.trunk_states, b.trunk_states)


@pytest.mark.parametrize("decode_mode", ["static", "compiled"])
def test_static_and_compiled_decoding_equal_eager_decoding(tmp_path, decode_mode):
    """rollout.decode_mode: a fixed-shape KV cache (device-side slots, attention over every slot under the
    causal mask), with or without torch.compile of the one-token step, samples the same tokens as the eager
    cache, with the same log-probs and trunk states up to reduction order. Rows end at different steps
    (stop tokens), prompts differ in length, and sampling runs through top-p; a second batch of other
    prompt lengths within the same 64-slot cache size reuses the compiled graph, and so does a third after
    a change of the weights (as after a training step; every generation makes new fused copies)."""
    _, ours = _models(tmp_path)
    roles = RoleModel.from_sft(ours, 2)
    kw = dict(max_new_tokens=16, stop_ids=list(range(2, 10)), pad_id=0, temperature=1.0, top_p=0.9, record_trunk=True)
    prompts = [_prompts(), [p[:2] + p for p in _prompts()]]
    if decode_mode == "compiled":
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    for n, batch in enumerate(prompts + prompts[:1]):
        if n == 2:
            with torch.no_grad():
                for p in roles.parameters():
                    p.mul_(1.01)
        want = generate(roles, batch, **kw, generator=torch.Generator().manual_seed(3))
        got = generate(roles, batch, **kw, generator=torch.Generator().manual_seed(3), decode_mode=decode_mode)
        assert len(set(map(len, want.responses))) > 1 and got.responses == want.responses
        assert got.finish_reasons == want.finish_reasons
        assert max(abs(a - b) for x, y in zip(got.logprobs, want.logprobs) for a, b in zip(x, y)) <= 1e-5
        real = want.document_ids == 0
        assert torch.equal(got.sequences, want.sequences)
        assert (got.trunk_states - want.trunk_states)[real].abs().max() <= 1e-5
    if decode_mode == "compiled":
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph for all three
    with pytest.raises(ValueError, match="decode_mode must be"):
        generate(ours, _prompts(), max_new_tokens=2, stop_ids=[], pad_id=0, decode_mode="graphs")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_fused_projections_compute_what_the_separate_ones_do_and_are_dropped_after(family):
    """Inside ``fused_projections`` q/k/v and gate/up run as one GEMM each over concatenated weights."""
    from rlhf_engine.models import Transformer, TransformerConfig
    from rlhf_engine.models.lora import apply_lora
    from rlhf_engine.models.transformer import Attention, SwiGLU, fused_projections
    from rlhf_engine.config.model import LoRAConfig

    gemma = family == "gemma2"
    cfg = TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, family=family, qkv_bias=family == "qwen2", hidden_act="gelu_tanh" if gemma
                            else "silu", norm_unit_offset=gemma, sandwich_norms=gemma, scale_embeddings=gemma)
    model = Transformer(cfg).eval()
    model.reset_parameters(torch.Generator().manual_seed(0))
    ids = torch.randint(0, 64, (3, 7))
    with torch.no_grad():
        want = model(ids)
        with fused_projections(model):
            fused = [m for m in model.modules() if isinstance(m, (Attention, SwiGLU)) and m.fused is not None]
            got = model(ids)
        assert len(fused) == 4 and all(m.fused is None for m in fused)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    apply_lora(model, LoRAConfig(rank=2, target_modules=["q_proj", "gate_proj"]), torch.Generator().manual_seed(1))
    with fused_projections(model):  # adapters stay on their own projections: those layers are not fused
        assert not any(m.fused is not None for m in model.modules() if isinstance(m, (Attention, SwiGLU)))


@pytest.mark.parametrize("k", [0, 3])
def test_flat_decode_step_generates_what_the_modules_generate(tmp_path, k):
    """generate() decodes through ``models.decode.DecodeProgram`` when it can (fuse=True); with fuse=False
    every step runs the modules with separate projections. Same tokens, log-probs and recorded trunk
    states, top-p sampling with rows that stop at different steps."""
    from rlhf_engine.models.decode import DecodeProgram
    from rlhf_engine.models.transformer import fused_projections

    _, ours = _models(tmp_path)
    roles = RoleModel.from_sft(ours, k)
    with fused_projections(roles.trunk, roles.head(Role.POLICY)):
        assert DecodeProgram.build(roles, 64) is not None
    kw = dict(max_new_tokens=16, stop_ids=list(range(2, 10)), pad_id=0, temperature=1.0, top_p=0.9,
              record_trunk=k > 0)
    flat = generate(roles, _prompts(), **kw, generator=torch.Generator().manual_seed(3))
    modules = generate(roles, _prompts(), **kw, generator=torch.Generator().manual_seed(3), fuse=False)
    assert len(set(map(len, flat.responses))) > 1 and flat.responses == modules.responses
    assert flat.finish_reasons == modules.finish_reasons and torch.equal(flat.sequences, modules.sequences)
    assert max(abs(a - b) for x, y in zip(flat.logprobs, modules.logprobs) for a, b in zip(x, y)) <= 1e-5
    if k:
        real = flat.document_ids == 0
        assert (flat.trunk_states - modules.trunk_states)[real].abs().max() <= 1e-5


def test_flat_decode_step_in_bf16_is_as_close_to_fp32_as_the_module_step(tmp_path):
    """bf16 weights (norms through rms_norm's fp32 path, bf16 rotary tables and GEMMs), trunk + policy head:
    the flat step and the module step differ by bf16 rounding only, so against the fp32 model's step the
    flat step is no further off than the module step is."""
    from rlhf_engine.models.decode import DecodeProgram
    from rlhf_engine.models.transformer import KVCache, fused_projections

    _models(tmp_path)
    B, P = 3, 6
    ids = torch.randint(3, 61, (B, P), generator=torch.Generator().manual_seed(2))
    steps = {}  # dtype -> [(module, flat)] per step, fp32 copies
    for dtype in (torch.float32, torch.bfloat16):
        roles = RoleModel.from_sft(load_hf_model(tmp_path, dtype=dtype).eval(), 2)
        caches = [KVCache(roles.config, B, P + 4, dtype=dtype) for _ in range(2)]
        steps[dtype] = []
        with torch.no_grad(), fused_projections(roles.trunk, roles.head(Role.POLICY)):
            program = DecodeProgram.build(roles, P + 4)
            for cache in caches:
                roles.decode(ids, positions=None, document_ids=None, kv_cache=cache)
            for t in range(3):
                tok, pos, docs = ids[:, t : t + 1], torch.full((B, 1), P + t), torch.zeros(B, 1, dtype=torch.long)
                want = roles.decode(tok, positions=pos, document_ids=docs, kv_cache=caches[0])
                got, _ = program.step(tok, pos, docs, caches[1])
                assert got.dtype == want.dtype == dtype
                steps[dtype].append((want.float(), got.float()))
    for (oracle, flat32), (module, flat) in zip(steps[torch.float32], steps[torch.bfloat16]):
        assert (flat32 - oracle).abs().max() <= 2e-6
        module_error, flat_error = (module - oracle).abs().max(), (flat - oracle).abs().max()
        assert 0 < module_error < 0.1 and flat_error <= 1.25 * module_error, (flat_error, module_error)


def test_flat_decode_step_is_not_built_where_it_could_differ_from_the_modules(tmp_path):
    """Adapters (unfused projections), a forward hook (the flat step would skip it) or no fused copies at
    all: ``DecodeProgram.build`` returns None and generation keeps the module path."""
    from rlhf_engine.config.model import LoRAConfig
    from rlhf_engine.models.decode import DecodeProgram
    from rlhf_engine.models.lora import apply_lora
    from rlhf_engine.models.transformer import fused_projections

    _, ours = _models(tmp_path)
    assert DecodeProgram.build(ours, 64) is None  # outside fused_projections
    with fused_projections(ours):
        assert DecodeProgram.build(ours, 64) is not None
        handle = ours.layers["1"].mlp.register_forward_hook(lambda *a: None)
        assert DecodeProgram.build(ours, 64) is None
        handle.remove()
    apply_lora(ours, LoRAConfig(rank=2, target_modules=["q_proj"]), torch.Generator().manual_seed(1))
    with fused_projections(ours):
        assert DecodeProgram.build(ours, 64) is None


def test_inverse_cdf_draws_equal_a_hand_computation():
    """sample_next draws one uniform u per row from the generator and picks the first token (in vocabulary
    order, or by descending probability under top-p) whose cumulative probability exceeds u times the kept
    mass. Recomputed here in float64 with the same uniforms, with top-k, top-p, both and neither."""
    torch.manual_seed(4)
    logits = torch.randn(64, 30) * 2
    for top_k, top_p in [(0, 1.0), (0, 0.8), (7, 1.0), (7, 0.8)]:
        got = sample_next(logits, temperature=0.7, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(9))
        u = torch.rand(64, 1, generator=torch.Generator().manual_seed(9))[:, 0].double()
        for row, token in enumerate(got.tolist()):
            z = logits[row].double() / 0.7
            if top_k:
                z = torch.where(z >= z.topk(top_k).values[-1], z, torch.tensor(float("-inf"), dtype=z.dtype))
            p = z.softmax(-1)
            order = p.argsort(descending=True, stable=True) if top_p < 1 else torch.arange(30)
            ps = p[order]
            kept = int(((ps.cumsum(0) - ps) < top_p).sum()) if top_p < 1 else 30
            target = float(u[row]) * float(ps[:kept].sum())
            want = int(order[int((ps[:kept].cumsum(0) > target).nonzero()[0])])
            assert token == want, (top_k, top_p, row)


def test_stop_strings_end_a_row(tmp_path):
    _, ours = _models(tmp_path)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"

    def decode(ids):
        return "".join(letters[i % len(letters)] for i in ids)

    free = generate(ours, _prompts(), max_new_tokens=12, stop_ids=[], pad_id=0, temperature=0.0)
    target = decode(free.responses[1][3:5])  # a two-character string the second row produces
    gen = generate(ours, _prompts(), max_new_tokens=12, stop_ids=[], pad_id=0, temperature=0.0,
                   stop_strings=[target], decode=decode)
    text = decode(gen.responses[1])
    assert gen.finish_reasons[1] == "stop" and text.endswith(target) and target not in text[:-1]


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, temperature=1.0, top_k=2, generator=g).tolist()) == {0, 1}
    p = logits[0].softmax(-1)  # [0.636, 0.234, 0.086, ...]: top_p=0.8 keeps tokens 0 and 1
    p80 = sample_next(logits, temperature=1.0, top_p=0.8, generator=g)
    assert set(p80.tolist()) == {0, 1}
    assert abs((p80 == 0).float().mean().item() - p[0] / (p[0] + p[1])) < 0.04  # renormalised over the kept set
    assert sample_next(logits[:3], temperature=0.0).tolist() == [0, 0, 0]


@pytest.mark.parametrize("scale", [4.0, 0.5])  # a peaked and a flat distribution (small and large nucleus)
def test_sampled_frequencies_equal_the_hand_computed_nucleus_distribution(scale):
    torch.manual_seed(3)
    logits = torch.randn(40) * scale
    T, top_k, top_p = 0.7, 30, 0.9
    # by hand: softmax(logits / T) over the top_k, sorted, keep while the mass before < top_p, renormalise
    z = logits / T
    z = torch.where(z >= z.topk(top_k).values[-1], z, torch.tensor(float("-inf")))
    p = z.softmax(-1).double()
    ps, order = p.sort(descending=True)
    keep = (ps.cumsum(0) - ps) < top_p
    expected = torch.zeros(40, dtype=torch.float64)
    expected[order[keep]] = ps[keep] / ps[keep].sum()
    n = 40000
    draws = sample_next(logits.repeat(n, 1), temperature=T, top_k=top_k, top_p=top_p,
                        generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=40).double() / n
    assert set(draws.unique().tolist()) <= set(order[keep].tolist())  # never outside the nucleus
    assert (freq - expected).abs().max() < 4 * (expected * (1 - expected) / n).sqrt().max() + 1e-3


def _tp_generate_body():
    import os
    from pathlib import Path

    from rlhf_engine.parallel import ParallelDims, apply_tensor_parallel

    path = Path(os.environ["CKPT"])
    plain = load_hf_model(path).eval()
    sharded = load_hf_model(path).eval()
    dims = ParallelDims(dp_replicate=1, dp_shard=1, pp=1, tp=2, world_size=2)
    dims.check_model(sharded.config)
    mesh = dims.build_mesh("cpu")
    apply_tensor_parallel(sharded, mesh["tp"])
    kw = dict(max_new_tokens=10, stop_ids=[2], pad_id=0, temperature=0.9, top_p=0.9)
    a = generate(plain, _prompts(), generator=torch.Generator().manual_seed(3), **kw)
    b = generate(sharded, _prompts(), generator=torch.Generator().manual_seed(3), **kw)
    c = generate(sharded, _prompts(), generator=torch.Generator().manual_seed(3), decode_mode="static", **kw)
    for other in (b, c):  # the static cache holds each rank's kv heads
        assert a.responses == other.responses
        assert all(torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-5) for x, y in zip(a.logprobs, other.logprobs))
    assert dist.get_world_size() == 2


@pytest.mark.dist
def test_tp2_generation_equals_tp1(tmp_path):
    _models(tmp_path)
    torchrun(_tp_generate_body, nproc=2, env={"CKPT": str(tmp_path)})
