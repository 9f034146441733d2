"""Parallel layouts under torchrun (gloo) against one process: same losses and gradients over 3
optimizer steps (fp32, <= 1e-5). Each rank also trains an unsharded copy of the model on the whole
batch, which is the single-process oracle."""

import copy
import os

import pytest
import torch
import torch.distributed as dist

from torchrun_helper import torchrun

from parallel_oracle import B, CFG, STEPS, _batch, _full, _loss


def _layout_body():
    from rlhf_engine.models import Transformer, TransformerConfig
    from rlhf_engine.parallel import ParallelDims, apply_activation_checkpointing, apply_fsdp, apply_tensor_parallel

    tp, fsdp, sp, ac = (int(os.environ[k]) for k in ("TP", "FSDP", "SP", "AC"))
    world = dist.get_world_size()
    cfg = TransformerConfig(**CFG, tie_word_embeddings=bool(int(os.environ["TIED"])))
    dims = ParallelDims(dp_replicate=1, dp_shard=fsdp, pp=1, tp=tp, world_size=world)
    dims.check_model(cfg)
    mesh = dims.build_mesh("cpu")
    model = Transformer(cfg)
    model.reset_parameters(torch.Generator().manual_seed(0))
    oracle = copy.deepcopy(model)
    apply_tensor_parallel(model, mesh["tp"], sequence_parallel=bool(sp))
    if ac:
        apply_activation_checkpointing(model)
    apply_fsdp(model, mesh["dp_shard"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3, foreach=False)  # eps: updates stay proportional to tiny grads
    opt_ref = torch.optim.AdamW(oracle.parameters(), lr=1e-2, eps=1e-3, foreach=False)
    dp_rank = mesh["dp_shard"].get_local_rank()
    rows = slice(dp_rank * B // fsdp, (dp_rank + 1) * B // fsdp)  # this rank's share of the batch
    for step in range(STEPS):
        ids, docs, targets = _batch(step)
        n = (targets != -100).sum()
        ref_loss = _loss(oracle, ids, docs, targets, n)
        ref_loss.backward()
        loss = _loss(model, ids[rows], docs[rows], targets[rows], n, scale=fsdp)
        loss.backward()
        total = loss.detach().clone() / fsdp
        dist.all_reduce(total)  # sum over all ranks: each dp group's tp ranks hold the same value
        total /= tp
        assert abs(total.item() - ref_loss.item()) <= 1e-5, (step, total.item(), ref_loss.item())
        ref_grads = dict(oracle.named_parameters())
        for name, p in model.named_parameters():
            want = ref_grads[_plain(name)].grad
            got = _full(p.grad)
            assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), (step, name)
        opt.step(), opt_ref.step()
        opt.zero_grad(), opt_ref.zero_grad()
    for name, p in model.named_parameters():  # the weights stayed together too
        assert (_full(p.detach()) - dict(oracle.named_parameters())[_plain(name)].detach()).abs().max() <= 1e-5, name


def _plain(name):  # activation checkpointing's wrapper shows in named_parameters (not in state dicts)
    return name.replace("_checkpoint_wrapped_module.", "")


LAYOUTS = {  # name: (nproc, TP, FSDP, SP, tied, activation checkpointing)
    "tp2": (2, 2, 1, 0, 0, 0),
    "tp2_sp": (2, 2, 1, 1, 0, 0),
    "tp2_tied": (2, 2, 1, 0, 1, 0),
    "fsdp2": (2, 1, 2, 0, 0, 0),
    "tp2_fsdp2_sp_ac": (4, 2, 2, 1, 1, 1),
}


@pytest.mark.dist
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout):
    nproc, tp, fsdp, sp, tied, ac = LAYOUTS[layout]
    torchrun(_layout_body, nproc=nproc, env={"TP": str(tp), "FSDP": str(fsdp), "SP": str(sp), "TIED": str(tied),
                                             "AC": str(ac)})


def _bf16_fsdp_body():
    from rlhf_engine.models import Transformer, TransformerConfig
    from rlhf_engine.parallel import ParallelDims, apply_fsdp

    mesh = ParallelDims(dp_replicate=1, dp_shard=2, pp=1, tp=1, world_size=2).build_mesh("cpu")
    model = Transformer(TransformerConfig(**CFG))
    model.reset_parameters(torch.Generator().manual_seed(0))
    oracle = copy.deepcopy(model)
    apply_fsdp(model, mesh["dp_shard"], param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    ids, docs, targets = _batch(0)
    n = (targets != -100).sum()
    rows = slice(2 * dist.get_rank(), 2 * dist.get_rank() + 2)
    _loss(model, ids[rows], docs[rows], targets[rows], n, scale=2).backward()
    _loss(oracle, ids, docs, targets, n).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), oracle.named_parameters()):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32  # fp32 masters and reduced grads
        got = _full(p.grad)
        assert (got - q.grad).norm() / q.grad.norm() < 2e-2, name  # bf16 compute: within bf16 error


@pytest.mark.dist
def test_fsdp_bf16_compute_with_fp32_masters_and_reduction():
    torchrun(_bf16_fsdp_body, nproc=2)
