"""Score models: scores equal transformers' sequence classifier loaded from our export; the trunk is
frozen; packed sequences score as if alone."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhf_engine.models import Transformer, TransformerConfig
from rlhf_engine.models.score import ScoreModel, load_score_model, save_score_model

CFG = TransformerConfig(vocab_size=101, hidden_size=48, intermediate_size=96, num_layers=3, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=64)


def _lm(family="llama"):
    cfg = TransformerConfig(**{**CFG.__dict__, "family": family, "qkv_bias": family == "qwen2"})
    lm = Transformer(cfg)
    lm.reset_parameters(torch.Generator().manual_seed(0))
    return lm


@pytest.mark.parametrize("trunk_layers,outputs,family", [(0, 1, "llama"), (2, 1, "llama"), (1, 3, "qwen2")])
def test_export_scores_equal_transformers_sequence_classifier(tmp_path, trunk_layers, outputs, family):
    model = ScoreModel.from_lm(_lm(family), trunk_layers, outputs, generator=torch.Generator().manual_seed(1))
    model.bias.fill_(0.25)
    ids = torch.randint(0, 101, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids)[0, -1]  # (outputs,)
    save_score_model(model, tmp_path / "rm", labels=[f"r{i}" for i in range(outputs)])
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        theirs = hf(ids).logits[0]
    torch.testing.assert_close(ours - 0.25, theirs, rtol=1e-5, atol=1e-5)  # HF has no bias: raw scores
    back = load_score_model(tmp_path / "rm")
    assert back.trunk_layers == trunk_layers
    with torch.no_grad():
        torch.testing.assert_close(back(ids)[0, -1], ours)


def test_trunk_is_frozen_and_k0_trains_everything():
    cut = ScoreModel.from_lm(_lm(), 2)
    trainable = {n for n, p in cut.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)
    ids = torch.randint(0, 101, (2, 9))
    cut(ids)[..., 0].sum().backward()
    assert all(p.grad is None for p in cut.trunk.parameters())
    full = ScoreModel.from_lm(_lm(), 0)
    assert all(p.requires_grad for p in full.parameters())


def test_packed_sequences_score_as_if_alone():
    model = ScoreModel.from_lm(_lm(), 1)
    a, b = torch.randint(0, 101, (5,)), torch.randint(0, 101, (7,))
    packed = torch.cat([a, b])[None]
    docs = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        s = model(packed, document_ids=docs)[0, :, 0]
        torch.testing.assert_close(s[4], model(a[None])[0, -1, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s[11], model(b[None])[0, -1, 0], rtol=1e-5, atol=1e-6)


def test_mean_pooled_score_is_the_mean_over_response_tokens_and_survives_export(tmp_path):
    """``pooling="mean"``: a response's score is the mean of the per-token scores over its response tokens,
    computed here by hand from each sequence run alone; packing does not change it; the export keeps it."""
    from rlhf_engine.data.preference import pack_sequences

    model = ScoreModel.from_lm(_lm(), 1, generator=torch.Generator().manual_seed(1), pooling="mean")
    g = torch.Generator().manual_seed(4)
    seqs = [(torch.randint(0, 101, (n,), generator=g).tolist(), p) for n, p in ((9, 4), (6, 5), (12, 2))]
    packed = pack_sequences(seqs, 32, pad_id=0)
    with torch.no_grad():
        got = packed.read_score(model(packed.input_ids, document_ids=packed.document_ids)[..., 0], model.pooling)
        want = torch.stack([model(torch.tensor([ids]))[0, p:, 0].mean() for ids, p in seqs])  # tokens p..n-1
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, packed.read_last(model(packed.input_ids, document_ids=packed.document_ids)[..., 0]))
    save_score_model(model, tmp_path / "rm")
    back = load_score_model(tmp_path / "rm")
    assert back.pooling == "mean"
    with pytest.raises(ValueError, match="pooling"):
        ScoreModel(CFG, 1, pooling="max")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_uniform_head_attention_starts_as_the_causal_mean_of_the_values(tmp_path, family):
    """``head_attention="uniform"``: the first head layer's query (weight and, for Qwen2, bias) starts at
    zero and every other weight as copied, so that layer's attention output at position t is
    o_proj of the mean of v_proj over positions 0..t, per query head from its key/value head (GQA),
    computed here by hand from the layer's own input; the export stays a transformers classifier."""
    lm = _lm(family)
    copy = ScoreModel.from_lm(lm, 1, generator=torch.Generator().manual_seed(1))
    model = ScoreModel.from_lm(lm, 1, generator=torch.Generator().manual_seed(1), head_attention="uniform")
    attn = model.head.layers["1"].self_attn
    assert not attn.q_proj.weight.any() and (attn.q_proj.bias is None or not attn.q_proj.bias.any())
    ours, theirs = model.state_dict(), copy.state_dict()
    changed = {n for n in ours if not torch.equal(ours[n], theirs[n])}
    assert "head.layers.1.self_attn.q_proj.weight" in changed  # (a copied bias may already be 0)
    assert changed <= {"head.layers.1.self_attn.q_proj.weight", "head.layers.1.self_attn.q_proj.bias"}
    seen = {}
    attn.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        scores = model(ids)[:, -1, 0]
        x = seen["x"]  # (B, S, D) the attention's (normed) input
        B, S, _ = x.shape
        h, kvh, d = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
        v = attn.v_proj(x).view(B, S, kvh, d).repeat_interleave(h // kvh, dim=2)  # (B, S, h, d)
        mean = v.cumsum(dim=1) / torch.arange(1, S + 1).view(1, S, 1, 1)  # causal mean over 0..t
        want = attn.o_proj(mean.reshape(B, S, h * d))
        torch.testing.assert_close(seen["out"], want, rtol=1e-5, atol=1e-6)
    save_score_model(model, tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        for b in range(ids.shape[0]):  # no pad token in this config: one row at a time
            torch.testing.assert_close(hf(ids[b : b + 1]).logits[0, 0], scores[b], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="head_attention"):
        ScoreModel.from_lm(lm, 1, head_attention="zero")
