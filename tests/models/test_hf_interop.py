"""Checkpoint interop edge cases: sharded checkpoints both ways, refusals, bf16."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_engine.models import load_hf_model, save_hf_model
from rlhf_engine.models.hf import INDEX_NAME, UnsupportedCheckpointError

CFG = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)


def _ids(n=11):
    return torch.randint(0, 101, (2, n), generator=torch.Generator().manual_seed(0))


def test_sharded_checkpoint_loads_and_exports_sharded(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**CFG)).eval()
    hf.save_pretrained(tmp_path / "in", max_shard_size="20KB")
    assert (tmp_path / "in" / INDEX_NAME).exists()
    ours = load_hf_model(tmp_path / "in").eval()
    out = save_hf_model(ours, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(again(_ids()).logits, hf(_ids()).logits)


def test_export_replaces_existing_directory_atomically(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**CFG))
    hf.save_pretrained(tmp_path / "in")
    ours = load_hf_model(tmp_path / "in")
    save_hf_model(ours, tmp_path / "out")
    with torch.no_grad():
        ours.norm.weight.fill_(2.0)
    save_hf_model(ours, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temporary left behind
    assert torch.equal(load_hf_model(tmp_path / "out").norm.weight, torch.full((32,), 2.0))


@pytest.mark.parametrize("field, value, message", [
    ("hidden_act", "gelu", "hidden activation 'gelu' not supported"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64}, "rope_type 'yarn' is not supported"),
    ("attention_dropout", 0.1, "attention_dropout > 0"),
])
def test_unsupported_config_fields_are_refused(tmp_path, field, value, message):
    LlamaForCausalLM(LlamaConfig(**CFG)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedCheckpointError, match=message):
        load_hf_model(tmp_path)


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedCheckpointError, match="model_type 'gpt2' is not supported"):
        load_hf_model(tmp_path)


def test_missing_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    LlamaForCausalLM(LlamaConfig(**CFG)).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedCheckpointError, match="missing tensors.*layers.1.mlp.up_proj.weight"):
        load_hf_model(tmp_path)


def test_bf16_matches_transformers_bf16(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CFG, initializer_range=0.2)).save_pretrained(tmp_path)  # logits O(5)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = load_hf_model(tmp_path, dtype=torch.bfloat16).eval()
    assert ours.output_weight.dtype == torch.bfloat16
    fp32 = load_hf_model(tmp_path).eval()
    with torch.no_grad():
        got, want, exact = ours.logits(ours(_ids())).float(), hf(_ids()).logits.float(), fp32.logits(fp32(_ids()))
    assert exact.abs().max() > 2.0
    # Same bf16 rounding points as transformers (measured: identical); both within bf16 error of fp32.
    assert (got - want).abs().max() <= 0.032  # one bf16 ulp at |x| in [4, 8)
    assert (got - exact).abs().max() < 0.15 and (want - exact).abs().max() < 0.15
