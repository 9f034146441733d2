"""torchao float8 under tensor (and sequence) parallelism (torchrun, gloo) against one process holding the
same float8 model: tensor-wise scaling gives the same scales, so the same losses and gradients up to
fp32 summation order; row-wise scaling takes per-shard row scales in row-parallel layers, so it is
checked to be as close to the unquantized gradient as one process is. (The float8 all-gather of a
sequence-parallel block input needs NCCL: gloo has no float8 dtypes, so here the gather stays in high
precision and the cast follows it, which gives the same numbers.)"""

import pytest
import torch

from rlhf_engine.config import FP8Config
from rlhf_engine.parallel.fp8 import apply_fp8, fp8_metrics
from torchrun_helper import torchrun

pytest.importorskip("torchao", reason="torchao is the PyTorch-native FP8 backend (dev extra)")


def _fp8_tp_body():
    """TP2 (and sequence parallel) with torchao float8 against one process with the same float8 model."""
    import copy

    import torch.distributed as dist
    from parallel_oracle import CFG, STEPS, _batch, _full, _loss

    from rlhf_engine.models import Transformer, TransformerConfig
    from rlhf_engine.parallel import ParallelDims, apply_tensor_parallel

    mesh = ParallelDims(dp_replicate=1, dp_shard=1, pp=1, tp=2, world_size=dist.get_world_size()).build_mesh("cpu")
    base = Transformer(TransformerConfig(**CFG))
    base.reset_parameters(torch.Generator().manual_seed(0))
    for recipe, sp in (("tensorwise", False), ("tensorwise", True), ("rowwise", False)):
        cfg = FP8Config(recipe=recipe)
        model, oracle, exact = apply_fp8(copy.deepcopy(base), cfg), apply_fp8(copy.deepcopy(base), cfg), copy.deepcopy(base)
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=sp)
        assert fp8_metrics(model) == fp8_metrics(oracle)  # on every rank: amax over the shards
        params = {"model": model, "oracle": oracle, "exact": exact}
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-2, eps=1e-3, foreach=False) for k, m in params.items()}
        for step in range(STEPS):
            ids, docs, targets = _batch(step)
            n = (targets != -100).sum()
            losses = {k: _loss(m, ids, docs, targets, n) for k, m in params.items()}
            for loss in losses.values():
                loss.backward()
            ref = dict(oracle.named_parameters())
            ex = dict(exact.named_parameters())
            for name, p in model.named_parameters():
                got, want, true = _full(p.grad), ref[name].grad, ex[name].grad
                err = lambda a: ((a - true).norm() / true.norm()).item()  # noqa: E731
                if recipe == "tensorwise":  # same scales as one process: equal up to fp32 summation order
                    assert (got - want).norm() <= 2e-3 * want.norm(), (recipe, sp, step, name)
                elif step == 0:  # per-shard row scales: as close to the unquantized gradient as one process
                    assert err(got) <= 1.25 * err(want) + 5e-3, (name, err(got), err(want))
            if recipe == "tensorwise":
                assert abs(losses["model"].item() - losses["oracle"].item()) <= 1e-4, (sp, step, losses)
            for o in opts.values():
                o.step()
                o.zero_grad()


@pytest.mark.dist
def test_torchao_fp8_under_tensor_parallel_matches_one_process():
    torchrun(_fp8_tp_body, nproc=2)


def _fp8_tp_fsdp_body():
    """TP2 x FSDP2 with sequence parallelism. Each data-parallel rank scales its own activations, so the
    one-process oracle runs the two ranks' shares as two micro-batches. With ``float8_all_gather`` torchao
    reduces a weight's amax over the FSDP mesh only, so weight scales are per tensor-parallel shard: a
    different (finer) quantization, checked against the unquantized gradient instead."""
    import copy
    import math

    import torch.distributed as dist
    from parallel_oracle import B, CFG, _batch, _full, _loss

    from rlhf_engine.models import Transformer, TransformerConfig
    from rlhf_engine.parallel import ParallelDims, apply_fsdp, apply_tensor_parallel

    mesh = ParallelDims(dp_replicate=1, dp_shard=2, pp=1, tp=2, world_size=dist.get_world_size()).build_mesh("cpu")
    base = Transformer(TransformerConfig(**CFG))
    base.reset_parameters(torch.Generator().manual_seed(0))
    dp_rank = mesh["dp_shard"].get_local_rank()
    shares = [slice(r * B // 2, (r + 1) * B // 2) for r in range(2)]
    ids, docs, targets = _batch(0)
    n = (targets != -100).sum()
    exact, oracle = copy.deepcopy(base), apply_fp8(copy.deepcopy(base), FP8Config())
    ref_loss = {}
    for name, ref in (("exact", exact), ("oracle", oracle)):
        ref_loss[name] = sum(_loss(ref, ids[s], docs[s], targets[s], n) for s in shares)
        ref_loss[name].backward()
    want = dict(oracle.named_parameters())
    true = dict(exact.named_parameters())
    for all_gather in (False, True):
        model = apply_fp8(copy.deepcopy(base), FP8Config(float8_all_gather=all_gather))
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True)
        apply_fsdp(model, mesh["dp_shard"])
        s = shares[dp_rank]
        loss = _loss(model, ids[s], docs[s], targets[s], n, scale=2)
        loss.backward()
        total = loss.detach() / 2
        dist.all_reduce(total)
        total /= 2  # the tp peers hold the same value
        grads = {name: _full(p.grad) for name, p in model.named_parameters()}
        if not all_gather:
            assert abs(total.item() - ref_loss["oracle"].item()) <= 1e-5
            for name, g in grads.items():
                assert (g - want[name].grad).norm() <= 2e-3 * want[name].grad.norm(), name
        else:
            err = lambda get: math.sqrt(sum(float((get(k) - true[k].grad).norm() ** 2) for k in grads))  # noqa: E731
            assert err(grads.__getitem__) <= 1.25 * err(lambda k: want[k].grad), (err(grads.__getitem__),)
            assert abs(total.item() - ref_loss["exact"].item()) <= 5e-3


@pytest.mark.dist
@pytest.mark.slow
def test_torchao_fp8_under_tp_and_fsdp_with_float8_all_gather():
    torchrun(_fp8_tp_fsdp_body, nproc=4)
