"""Shared pieces of the parallel-vs-single-process tests: the model shape, the batches, the loss."""

import torch

CFG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
B, S, STEPS = 4, 16, 3


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, CFG["vocab_size"], (B, S), generator=g)
    docs = torch.tensor([[0] * 9 + [1] * 7, [0] * 16, [0] * 5 + [1] * 5 + [2] * 6, [0] * 12 + [-1] * 4])
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    targets[3, 11:] = -100  # padding and the last token of each row have no target
    return ids, docs, targets


def _loss(model, ids, docs, targets, n_global, scale=1.0):
    """Global-token-mean NLL minus an entropy bonus; `scale` undoes FSDP's averaging over dp ranks."""
    out = model(ids, document_ids=docs, targets=targets, temperature=0.9)
    keep = (targets != -100).float()
    return scale * (-(out.logp * keep).sum() - 0.1 * (out.entropy * keep).sum()) / n_global


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
