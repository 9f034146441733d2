"""Activation checkpointing recomputes layers without changing a number, and keeps parameter names."""

import copy

import torch

from rlhf_engine.models import Transformer, TransformerConfig
from rlhf_engine.parallel import apply_activation_checkpointing


def test_same_loss_grads_and_state_dict_names():
    model = Transformer(TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4))
    model.reset_parameters(torch.Generator().manual_seed(0))
    wrapped = apply_activation_checkpointing(copy.deepcopy(model))
    assert list(wrapped.state_dict()) == list(model.state_dict())
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(ids, -1, 1)
    grads = []
    for m in (model, wrapped):
        out = m(ids, targets=targets)
        (-(out.logp.sum()) - out.entropy.sum()).backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
