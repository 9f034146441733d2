"""Sharded checkpoints: atomic saves, resharding across layouts (identical logits), HF export from a
sharded run, optimizer state and progress restored."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from torchrun_helper import torchrun

CFG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


def _ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))


def _build(tp=1, fsdp=1, world=1):
    from rlhf_engine.models import Transformer, TransformerConfig
    from rlhf_engine.parallel import ParallelDims, apply_fsdp, apply_tensor_parallel

    model = Transformer(TransformerConfig(**CFG))
    model.reset_parameters(torch.Generator().manual_seed(0))
    if world > 1:
        mesh = ParallelDims(dp_replicate=1, dp_shard=fsdp, pp=1, tp=tp, world_size=world).build_mesh("cpu")
        apply_tensor_parallel(model, mesh["tp"])
        apply_fsdp(model, mesh["dp_shard"])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)


def _train_step(model, opt):
    ids = _ids()
    targets = torch.roll(ids, -1, 1)
    out = model(ids, targets=targets)
    (-out.logp.mean()).backward()
    opt.step()
    opt.zero_grad()


def _logp(model):
    ids = _ids()
    with torch.no_grad():
        return model(ids, targets=torch.roll(ids, -1, 1)).logp


def _save_body():  # train one step at the given layout, save, record log-probs
    from rlhf_engine.parallel.checkpoint import export_hf, save_checkpoint

    tp, fsdp = int(os.environ["TP"]), int(os.environ["FSDP"])
    out = Path(os.environ["OUT"])
    model, opt = _build(tp, fsdp, dist.get_world_size())
    _train_step(model, opt)
    save_checkpoint(out / "ckpt", 1, model, opt, progress={"tokens": 24})
    logp = _logp(model)
    export_hf(model, out / "hf")
    if dist.get_rank() == 0:
        torch.save(logp, out / "logp.pt")


def _load_body():  # load what another layout saved; same log-probs; the optimizer continues identically
    from rlhf_engine.parallel.checkpoint import latest_checkpoint, load_checkpoint

    tp, fsdp = int(os.environ["TP"]), int(os.environ["FSDP"])
    out = Path(os.environ["OUT"])
    model, opt = _build(tp, fsdp, dist.get_world_size())
    progress = load_checkpoint(latest_checkpoint(out / "ckpt"), model, opt)
    assert progress["step"] == 1 and progress["tokens"] == 24
    assert (_logp(model) - torch.load(out / "logp.pt")).abs().max() <= 1e-6
    _train_step(model, opt)
    logp2 = _logp(model)
    if dist.get_rank() == 0:
        torch.save(logp2, out / f"logp_after_{dist.get_world_size()}.pt")


def _single_continue(out: Path):
    from rlhf_engine.parallel.checkpoint import latest_checkpoint, load_checkpoint

    model, opt = _build()
    load_checkpoint(latest_checkpoint(out / "ckpt"), model, opt)
    assert (_logp(model) - torch.load(out / "logp.pt")).abs().max() <= 1e-6
    _train_step(model, opt)
    return _logp(model)


@pytest.mark.dist
@pytest.mark.parametrize("save_layout, load_layout", [
    ((2, 2, 1), (2, 1, 2)),  # tp2 -> fsdp2
    ((2, 1, 2), (2, 2, 1)),  # fsdp2 -> tp2
])
def test_reshard_between_layouts(tmp_path, save_layout, load_layout):
    (n_s, tp_s, fs_s), (n_l, tp_l, fs_l) = save_layout, load_layout
    torchrun(_save_body, nproc=n_s, env={"TP": str(tp_s), "FSDP": str(fs_s), "OUT": str(tmp_path)})
    torchrun(_load_body, nproc=n_l, env={"TP": str(tp_l), "FSDP": str(fs_l), "OUT": str(tmp_path)})
    # ... and to one process (tp2/fsdp2 -> tp1): identical log-probs, and the next step agrees too
    after_single = _single_continue(tmp_path)
    assert (after_single - torch.load(tmp_path / f"logp_after_{n_l}.pt")).abs().max() <= 1e-5


@pytest.mark.dist
def test_hf_export_from_sharded_run(tmp_path):
    from transformers import LlamaForCausalLM

    torchrun(_save_body, nproc=2, env={"TP": "2", "FSDP": "1", "OUT": str(tmp_path)})
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _ids()
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits, -1).gather(-1, torch.roll(ids, -1, 1)[..., None])[..., 0]
    assert (logp - torch.load(tmp_path / "logp.pt")).abs().max() <= 1e-5


def test_single_process_save_is_atomic_and_latest_survives_a_killed_save(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from rlhf_engine.parallel import checkpoint as ck

    model, opt = _build()
    _train_step(model, opt)
    first = ck.save_checkpoint(tmp_path, 1, model, opt, progress={"tokens": 1})
    want = _logp(model)
    _train_step(model, opt)

    def killed(state, checkpoint_id, **_):  # dies after writing part of the data
        Path(checkpoint_id, "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(dcp, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, model, opt)
    monkeypatch.undo()
    assert ck.latest_checkpoint(tmp_path) == first  # the half-written step_2.tmp is never chosen
    fresh, fresh_opt = _build()
    progress = ck.load_checkpoint(first, fresh, fresh_opt)
    assert progress == {"step": 1, "world_size": 1, "tokens": 1}
    assert torch.equal(_logp(fresh), want)
    assert json.loads((first / "progress.json").read_text())["step"] == 1


def test_resume_restores_rng_and_continues_bit_for_bit(tmp_path):
    from rlhf_engine.parallel import checkpoint as ck

    model, opt = _build()
    _train_step(model, opt)
    ck.save_checkpoint(tmp_path, 1, model, opt)
    noise_then = torch.rand(3)
    _train_step(model, opt)
    straight = _logp(model)
    torch.manual_seed(123)  # scramble the RNG, then resume
    resumed, resumed_opt = _build()
    ck.load_checkpoint(ck.latest_checkpoint(tmp_path), resumed, resumed_opt)
    assert torch.equal(torch.rand(3), noise_then)
    _train_step(resumed, resumed_opt)
    assert torch.equal(_logp(resumed), straight)
