"""Pipeline parallel under torchrun (gloo): GPipe, 1F1B, interleaved 1F1B, TP x PP, PP x FSDP and
TP x PP x FSDP give the same losses and gradients as one process over 3 optimizer steps; bad splits
are refused."""

import copy
import os

import pytest
import torch
import torch.distributed as dist

from torchrun_helper import torchrun

CFG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2)


def _pp_body():
    from parallel_oracle import B, STEPS, _batch, _full, _loss

    from rlhf_engine.models import Transformer, TransformerConfig
    from rlhf_engine.parallel import ParallelDims, apply_fsdp, apply_tensor_parallel
    from rlhf_engine.parallel.pipeline import build_schedule, split_into_stages

    tp, pp, per_rank, fsdp = (int(os.environ[k]) for k in ("TP", "PP", "STAGES_PER_RANK", "FSDP"))
    schedule_name = os.environ["SCHEDULE"]
    cfg = TransformerConfig(**CFG)
    dims = ParallelDims(dp_replicate=1, dp_shard=fsdp, pp=pp, tp=tp, world_size=dist.get_world_size())
    dims.check_model(cfg)
    mesh = dims.build_mesh("cpu")
    model = Transformer(cfg)
    model.reset_parameters(torch.Generator().manual_seed(0))
    oracle = copy.deepcopy(model)
    stages = split_into_stages(model, mesh["pp"].get_local_rank(), pp, per_rank)
    for _, stage in stages:
        apply_tensor_parallel(stage, mesh["tp"], sequence_parallel=tp > 1)
        apply_fsdp(stage, mesh["dp_shard"], reshard_after_forward=False)  # keep params across microbatches
    params = [p for _, stage in stages for p in stage.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2, eps=1e-3, foreach=False)
    opt_ref = torch.optim.AdamW(oracle.parameters(), lr=1e-2, eps=1e-3, foreach=False)
    state = {}

    def loss_fn(output, target):  # one microbatch's share of the global-token-mean loss (x dp: FSDP averages)
        logp, entropy = output
        keep = (target != -100).float()
        return fsdp * (-(logp * keep).sum() - 0.1 * (entropy * keep).sum()) / state["n"]

    rows = slice(mesh["dp_shard"].get_local_rank() * B // fsdp, (mesh["dp_shard"].get_local_rank() + 1) * B // fsdp)
    schedule = build_schedule(stages, mesh["pp"], schedule_name, n_microbatches=B // fsdp, loss_fn=loss_fn)
    has_first = any(i == 0 for i, _ in stages)
    has_last = any(i == pp * per_rank - 1 for i, _ in stages)
    for step in range(STEPS):
        ids, docs, targets = _batch(step)
        state["n"] = (targets != -100).sum()
        ref_loss = _loss(oracle, ids, docs, targets, state["n"])
        ref_loss.backward()
        losses = []
        ids, docs, targets = ids[rows], docs[rows], targets[rows]  # this data-parallel rank's rows
        args = (ids,) if has_first else ()
        schedule.step(*args, document_ids=docs, targets=targets, temperature=0.9, target=targets, losses=losses)
        if has_last:
            total = torch.tensor(sum(l.item() for l in losses) / fsdp)
            dist.all_reduce(total, group=mesh["dp_shard"].get_group())
            assert abs(total.item() - ref_loss.item()) <= 1e-5, (step, losses, ref_loss)
        ref = dict(oracle.named_parameters())
        for _, stage in stages:
            for name, p in stage.named_parameters():
                want = ref[name].grad
                assert (_full(p.grad) - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), (step, name)
        opt.step(), opt_ref.step()
        opt.zero_grad(), opt_ref.zero_grad()


CASES = {  # name: (nproc, TP, PP, stages per rank, schedule, FSDP)
    "pp2_gpipe": (2, 1, 2, 1, "gpipe", 1),
    "pp2_1f1b": (2, 1, 2, 1, "1f1b", 1),
    "pp2_interleaved": (2, 1, 2, 2, "interleaved_1f1b", 1),
    "tp2_pp2_sp_1f1b": (4, 2, 2, 1, "1f1b", 1),
    "pp2_fsdp2_1f1b": (4, 1, 2, 1, "1f1b", 2),
    "tp2_pp2_fsdp2_sp_interleaved": (8, 2, 2, 2, "interleaved_1f1b", 2),
}


@pytest.mark.dist
@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_single_process(case):
    nproc, tp, pp, per_rank, schedule, fsdp = CASES[case]
    torchrun(_pp_body, nproc=nproc, env={"TP": str(tp), "PP": str(pp), "STAGES_PER_RANK": str(per_rank),
                                         "SCHEDULE": schedule, "FSDP": str(fsdp)})


def test_bad_splits_are_refused():
    from rlhf_engine.models import Transformer, TransformerConfig
    from rlhf_engine.parallel import LayoutError
    from rlhf_engine.parallel.pipeline import split_into_stages

    with torch.device("meta"):
        model = Transformer(TransformerConfig(**{**CFG, "num_layers": 6}))
        tied = Transformer(TransformerConfig(**CFG, tie_word_embeddings=True))
    with pytest.raises(LayoutError, match="num_layers=6 is not divisible by the 4 pipeline stages"):
        split_into_stages(model, 0, 2, stages_per_rank=2)
    with pytest.raises(LayoutError, match="tie_word_embeddings with pp > 1"):
        split_into_stages(tied, 0, 2)
    stages = split_into_stages(model, 1, 3)  # rank 1 of 3: layers 2-3, neither embedding nor head
    ((index, stage),) = stages
    assert index == 1 and list(stage.layers) == ["2", "3"] and stage.embed_tokens is None and stage.norm is None
    assert {n.split(".")[0] for n, _ in stage.named_parameters()} == {"layers"}
