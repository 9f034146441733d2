"""Our decoder against transformers' own Llama 2/3.x, Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3 on the same
random weights (fp32 oracle): logits, export round trip, KV-cache decoding, packing, greedy generation
against ``generate``."""

import pytest
import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from rlhf_engine.models import load_hf_model, save_hf_model
from rlhf_engine.models.transformer import KVCache

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, max_position_embeddings=256)


def llama_gqa():  # GQA, untied, Llama-3 rope scaling
    cfg = LlamaConfig(**TINY, num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    return LlamaForCausalLM(cfg)


def llama_mqa_bias():  # multi-query, attention and MLP biases, tied, linear rope scaling
    cfg = LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                      tie_word_embeddings=True, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    return LlamaForCausalLM(cfg)


def mistral_window():  # sliding window shorter than the sequence
    cfg = MistralConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, sliding_window=5, head_dim=16)
    return MistralForCausalLM(cfg)


def qwen2_tied():  # q/k/v bias, tied embeddings
    cfg = Qwen2Config(**TINY, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg)


def qwen2_mixed_windows():  # per-layer sliding/full attention
    cfg = Qwen2Config(**TINY, num_attention_heads=4, num_key_value_heads=4, use_sliding_window=True,
                      sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return Qwen2ForCausalLM(cfg)


def llama3_2_tied():  # Llama 3.2 1B/3B's shape: tied embeddings, llama3 rope scaling, GQA, rope_theta 500000
    cfg = LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                      rms_norm_eps=1e-5, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 16})
    return LlamaForCausalLM(cfg)


def qwen3_qk_norm():  # per-head q/k RMSNorm, head_dim != hidden / heads, GQA, no biases, tied (Qwen3 0.6B-4B)
    cfg = Qwen3Config(**TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                      rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    return Qwen3ForCausalLM(cfg)


def qwen3_bias_windows():  # attention_bias on q/k/v/o, per-layer sliding windows, untied
    cfg = Qwen3Config(**TINY, num_attention_heads=4, num_key_value_heads=4, attention_bias=True,
                      use_sliding_window=True, sliding_window=4, max_window_layers=3,
                      layer_types=["full_attention", "sliding_attention", "full_attention"])
    return Qwen3ForCausalLM(cfg)


GEMMA_LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]


def gemma2_softcaps(vocab_size=97):  # GeGLU, (1 + w) sandwich norms, scaled embeddings, query_pre_attn_scalar
    # != head_dim, attention and final logit softcaps small enough to bend most scores, alternating windows, tied
    cfg = Gemma2Config(**{**TINY, "vocab_size": vocab_size}, num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                       attn_logit_softcapping=2.0, final_logit_softcapping=1.5, sliding_window=4, layer_types=GEMMA_LAYERS)
    return Gemma2ForCausalLM(cfg)


def gemma3_local_rope():  # + per-head (1 + w) q/k norms, a separate rotary base for the local layers and
    # linear scaling on the global ones, no softcaps (Gemma 3's defaults)
    cfg = Gemma3TextConfig(**TINY, num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=5, layer_types=GEMMA_LAYERS, rope_parameters={
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}})
    return Gemma3ForCausalLM(cfg)


BUILDERS = [llama_gqa, llama_mqa_bias, llama3_2_tied, mistral_window, qwen2_tied, qwen2_mixed_windows, qwen3_qk_norm,
            qwen3_bias_windows, gemma2_softcaps, gemma3_local_rope]


def _random_hf(builder, seed=0):
    torch.manual_seed(seed)
    hf = builder().eval()
    with torch.no_grad():  # non-trivial norms and biases so a missed weight shows up
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf.config._attn_implementation = "eager"  # independent of our SDPA path
    return hf


def _hf_logits(hf, ids, **kw):
    with torch.no_grad():
        return hf(input_ids=ids, **kw).logits


@pytest.fixture(params=BUILDERS, ids=lambda b: b.__name__)
def pair(request, tmp_path):
    hf = _random_hf(request.param)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf").eval()
    return hf, ours, tmp_path


def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours.logits(ours(ids))
    want = _hf_logits(hf, ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


def test_export_reloads_in_transformers(pair):
    hf, ours, tmp = pair
    out = save_hf_model(ours, tmp / "export")
    reloaded = type(hf).from_pretrained(out).eval()
    reloaded.config._attn_implementation = "eager"
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_hf_logits(reloaded, ids), _hf_logits(hf, ids))
    assert type(reloaded).__name__ == type(hf).__name__


def test_kv_cache_decoding_equals_full_forward(pair):
    _, ours, _ = pair
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours.logits(ours(ids))
        cache = KVCache(ours.config, batch_size=3, max_len=16)
        steps = [ours.logits(ours(ids[:, :7], kv_cache=cache))]  # prefill
        for t in range(7, 16):  # one token at a time
            steps.append(ours.logits(ours(ids[:, t : t + 1], kv_cache=cache)))
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_packed_row_equals_documents_run_separately(pair):
    _, ours, _ = pair
    g = torch.Generator().manual_seed(4)
    lengths = [5, 9, 3]
    docs = [torch.randint(0, 97, (n,), generator=g) for n in lengths]
    packed = torch.cat(docs)[None]  # (1, 17)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        got = ours.logits(ours(packed, document_ids=doc_ids))[0]
        want = torch.cat([ours.logits(ours(d[None]))[0] for d in docs])
    assert (got - want).abs().max().item() <= 1e-5


def test_greedy_generation_matches_transformers_generate(pair):
    """Our batched sampler at temperature 0 against ``generate`` (one prompt at a time, no stop token)."""
    from rlhf_engine.rollout import generate

    hf, ours, _ = pair
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (4, 9)]
    gen = generate(ours, prompts, max_new_tokens=8, stop_ids=[], pad_id=0, temperature=0.0)
    for prompt, out in zip(prompts, gen.responses):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                           pad_token_id=0)[0, len(prompt):].tolist()
        assert out == want


def _targets(ids):
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    return targets


def test_fused_logprobs_and_role_heads_match_transformers_log_softmax(pair):
    """The fused kernels' log-probs (Gemma 2's final softcap inside them) and those of RL role heads over a
    shared trunk (Gemma's scaled embeddings in the trunk) against log_softmax of transformers' logits."""
    from rlhf_engine.models import Role, RoleModel

    hf, ours, _ = pair
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(6))
    targets = _targets(ids)
    want = torch.log_softmax(_hf_logits(hf, ids), -1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    want = want * (targets != -100)
    roles = RoleModel.from_sft(ours, 1, roles=(Role.POLICY, Role.REFERENCE))
    with torch.no_grad():
        fused = ours(ids, targets=targets).logp
        out = roles(ids, targets=targets)
    for got in (fused, out.logp, out.ref_logp):
        assert (got - want).abs().max() <= 1e-5


def _tp_gemma_body():
    import tempfile

    import torch.distributed as dist

    from rlhf_engine.parallel import ParallelDims, apply_tensor_parallel

    where = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
    if dist.get_rank() == 0:  # transformers writes from the main process only: rank 0 saves, every rank loads
        _random_hf(lambda: gemma2_softcaps(vocab_size=96)).save_pretrained(where[0])  # tp2 splits the vocabulary
    dist.broadcast_object_list(where)
    path = where[0]
    plain, sharded = load_hf_model(path).eval(), load_hf_model(path).eval()
    dims = ParallelDims(dp_replicate=1, dp_shard=1, pp=1, tp=2, world_size=dist.get_world_size())
    apply_tensor_parallel(sharded, dims.build_mesh("cpu")["tp"], sequence_parallel=True)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(6))
    targets = _targets(ids)
    a, b = plain(ids, targets=targets), sharded(ids, targets=targets)
    assert (a.logp - b.logp).abs().max() <= 1e-5 and (a.entropy - b.entropy).abs().max() <= 1e-5
    a.logp.sum().backward()
    b.logp.sum().backward()
    full = dict(sharded.named_parameters())
    for name, p in plain.named_parameters():
        g = full[name].grad
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        assert (g - p.grad).abs().max() <= 1e-5 * max(1.0, p.grad.abs().max().item()), name


@pytest.mark.dist
@pytest.mark.slow
def test_gemma2_under_tp2_with_sequence_parallelism_equals_one_process():
    """Softcapped attention on each rank's heads, the sandwich norms on the sequence-sharded residual, the
    final softcap inside the vocabulary-parallel kernels: log-probs and every gradient as one process."""
    from torchrun_helper import torchrun

    torchrun(_tp_gemma_body, nproc=2)


@pytest.mark.parametrize("layout", ["cpu", "accelerator"])
def test_flat_decode_step_equals_the_module_step(pair, layout, monkeypatch):
    """``models.decode.DecodeProgram`` (generation's one-token step as one flat function) against the modules'
    own forward over the same cache, for every family: left padding (a document of its own), windows shorter
    than the steps, hidden states, logits and the keys/values written to the cache. ``accelerator``: the
    projections as a GPU holds them (``F.linear`` on the weights as they are, residual adds outside)."""
    from rlhf_engine.models.decode import DecodeProgram
    from rlhf_engine.models.transformer import Projection, fused_projections, local_vocab_shard, softcap_logits

    if layout == "accelerator":
        monkeypatch.setattr(Projection, "of", classmethod(lambda cls, weight, bias: cls(weight, bias, False)))
    _, ours, _ = pair
    g = torch.Generator().manual_seed(6)
    B, P, steps = 3, 6, 9
    ids = torch.randint(3, 97, (B, P), generator=g)
    docs = torch.zeros(B, P, dtype=torch.long)
    docs[0, :2] = docs[2, :4] = -1  # left padding
    positions = (docs.eq(0).cumsum(1) - 1).clamp(min=0)
    caches = [KVCache(ours.config, B, P + steps) for _ in range(2)]
    with torch.no_grad(), fused_projections(ours):
        program = DecodeProgram.build(ours, P + steps)
        assert program is not None
        for cache in caches:
            ours(ids, positions=positions, document_ids=docs, kv_cache=cache)
        pos = positions[:, -1:] + 1
        for t in range(steps):
            tok = torch.randint(3, 97, (B, 1), generator=g)
            step_docs = torch.zeros(B, 1, dtype=torch.long)
            step_docs[1] = -1 if t >= 5 else 0  # a row that finished: fed padding
            want = ours(tok, positions=pos, document_ids=step_docs, kv_cache=caches[0])
            got, trunk = program.step(tok, pos, step_docs, caches[1])
            assert trunk is None and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
            weight = local_vocab_shard(ours.output_weight)[0]
            want_logits = softcap_logits(torch.nn.functional.linear(want[:, 0], weight), ours.config.final_logit_softcapping)
            torch.testing.assert_close(program.logits(got[:, 0]), want_logits, rtol=0, atol=1e-5)
            pos = pos + step_docs.eq(0).long()
    assert caches[0].length == caches[1].length == P + steps
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=0, atol=2e-6)
    torch.testing.assert_close(caches[1].v, caches[0].v, rtol=0, atol=2e-6)
    assert torch.equal(caches[1].document_ids, caches[0].document_ids)
