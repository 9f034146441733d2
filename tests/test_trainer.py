"""The shared training loop: bit-for-bit resume, metrics and TensorBoard logs, schedules, data order."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_engine.config import load_config
from rlhf_engine.stages.sft import run_sft
from rlhf_engine.data.streams import BatchStream
from rlhf_engine.trainer import lr_factor

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.architecture.hidden_size=32", "model.architecture.intermediate_size=64",
        "model.architecture.num_layers=2", "model.architecture.vocab_size=300", "data.builtin_rows=120",
        "data.seq_len=96", "trainer.micro_batch_size=2", "trainer.grad_accum_steps=2", "trainer.eval_batches=1",
        "trainer.max_steps=6", "logging.log_every=1", "rollout.max_new_tokens=4", "optim.warmup_steps=2",
        "optim.weight_decay=0.1"]


def _train_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_after_step_3_continues_bit_for_bit(tmp_path, dtype):
    """Also in bf16 on one process, where the optimizer's fp32 master weights and moments are part of the
    checkpoint (``optimizer.MasterWeightAdamW``): resuming from the bf16 weights alone would diverge."""
    tiny = TINY + [f"precision.dtype={dtype}"]
    straight = run_sft(load_config(ROOT / "configs/sft_tiny.yaml", tiny + [f"trainer.out_dir={tmp_path / 'a'}"]))
    cut = tiny + [f"trainer.out_dir={tmp_path / 'b'}", "trainer.save_every=3"]
    first = run_sft(load_config(ROOT / "configs/sft_tiny.yaml", cut + ["trainer.stop_after=3"]))
    assert first["steps"] == 3 and not first["finished"] and "export" not in first
    assert (tmp_path / "b/checkpoints/sft/step_00000003/progress.json").exists()
    second = run_sft(load_config(ROOT / "configs/sft_tiny.yaml", cut))
    assert second["resumed"] and second["finished"]

    a, b = _train_records(tmp_path / "a"), _train_records(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # the file reads as one run
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "lr", "accuracy", "targets"):
            assert ra[key] == rb[key], (ra["step"], key)  # exact equality, not a tolerance
    wa = load_file(str(tmp_path / "a/hf/model.safetensors"))
    wb = load_file(str(tmp_path / "b/hf/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert straight["eval_loss_final"] == second["eval_loss_final"]
    assert straight["train_tokens"] == second["train_tokens"]
    # TensorBoard got the same scalars
    assert list((tmp_path / "b/tb").glob("events.out.tfevents.*"))


def test_tensorboard_scalars_match_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_sft(load_config(ROOT / "configs/sft_tiny.yaml", TINY + [f"trainer.out_dir={tmp_path}", "trainer.max_steps=3"]))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("sft/loss")]
    expected = [r["loss"] for r in _train_records(tmp_path)]
    assert losses == pytest.approx(expected, rel=1e-6)
    assert {"sft/grad_norm", "sft/tokens_per_s", "sft/peak_mem_mb", "sft/eval_loss"} <= set(acc.Tags()["scalars"])


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_warmup_then_decay(schedule):
    cfg = load_config(None, ["model.architecture.vocab_size=8", "data.seq_len=8", "optim.lr=1.0",
                             "trainer.max_steps=10", "trainer.micro_batch_size=1", "optim.warmup_steps=2",
                             f"optim.schedule={schedule}", "optim.min_lr_ratio=0.1"] + [
        f"model.architecture.{k}={v}" for k, v in dict(hidden_size=8, intermediate_size=8, num_layers=1,
                                                       num_heads=2, num_kv_heads=1).items()]).optim
    f = [lr_factor(s, cfg, 10) for s in range(11)]
    assert f[:2] == [0.5, 1.0]
    if schedule == "constant":
        assert f[2:] == [1.0] * 9
    else:
        assert f[2] == 1.0 and f[10] == pytest.approx(0.1) and all(x >= y for x, y in zip(f[2:], f[3:]))
        mid = 0.1 + 0.9 * (0.5 if schedule == "cosine" else 0.5)  # halfway through the decay
        assert f[6] == pytest.approx(mid)


def test_batch_stream_restores_position_across_epochs():
    def plan(epoch):  # 3 micro-batches per epoch, order depends on the epoch
        return [(epoch, i) for i in ((0, 1, 2) if epoch % 2 == 0 else (2, 0, 1))]

    s = BatchStream(plan, lambda p: p)
    straight = s.take(4) + s.take(4)
    s2 = BatchStream(plan, lambda p: p)
    head = s2.take(4)
    s3 = BatchStream(plan, lambda p: p)
    s3.load_state_dict(s2.state_dict())
    assert head + s3.take(4) == straight
    assert s3.state_dict() == {"epoch": 2, "index": 2}
