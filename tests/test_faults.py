"""Fault tolerance, one test per fault: a stopped rank, non-finite training, damaged checkpoint and
metrics files, a full disk, SIGTERM (preemption), an incompatible resume, a kill between the final
evaluation and the export, and Ctrl-C. Every failure is one line and a distinct exit code."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.architecture.hidden_size=64", "model.architecture.intermediate_size=128",
        "model.architecture.num_layers=2", "model.architecture.num_heads=4", "model.architecture.num_kv_heads=2",
        "data.builtin_rows=300", "data.seq_len=128", "trainer.micro_batch_size=2", "trainer.eval_batches=2",
        "trainer.eval_every=0", "logging.log_every=1", "logging.tensorboard=false", "optim.warmup_steps=0"]


def _sft(out: Path, *extra: str) -> int:
    return main(["sft", "--config", "configs/sft_tiny.yaml", *TINY, f"trainer.out_dir={out}", *extra])


def _records(out: Path) -> list[dict]:
    return [json.loads(line, parse_constant=_no_constant) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _no_constant(name):  # strict JSON: NaN / Infinity are not JSON
    raise ValueError(f"non-JSON constant {name}")


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _records(out) if "loss" in r]


# ---------------------------------------------------------------------------------------------- 2. non-finite


def test_non_finite_steps_are_skipped_then_stop_the_run_with_nothing_non_finite_saved(tmp_path, capsys):
    rc = _sft(tmp_path, "optim.lr=1e4", "trainer.max_steps=30", "trainer.save_every=1", "trainer.max_bad_steps=3")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and err.startswith("error: sft: 3 steps in a row") and "non-finite" in err and "lower optim.lr" in err
    records = _records(tmp_path)  # every line strict JSON: a NaN loss or gradient norm is written as null
    bad = [r for r in records if "loss" in r and (r["loss"] is None or r["grad_norm"] is None)]
    assert len(bad) >= 3 and bad[-1]["skipped_steps"] >= 3
    from rlhf_engine.parallel.checkpoint import complete_checkpoints

    for ckpt in complete_checkpoints(tmp_path / "checkpoints" / "sft"):  # nothing non-finite was saved
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(str(ckpt)).read_metadata()
        state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.state_dict_metadata.items()
                 if hasattr(v, "size") and k.startswith("model.")}
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
        assert all(torch.isfinite(t).all() for t in state.values()), ckpt


def test_a_skipped_step_leaves_weights_optimizer_and_schedule_untouched():
    from rlhf_engine.algorithms.objective import ModelPass, Objective
    from rlhf_engine.config import load_config
    from rlhf_engine.trainer import build_optimizer, build_scheduler, train_step

    model = torch.nn.Linear(3, 1)
    cfg = load_config(ROOT / "configs/sft_tiny.yaml", ["optim.warmup_steps=0"])

    class Batch:
        def counts(self):
            return {"targets": 1, "tokens": 1}

    def nan_loss(out, totals):
        return out.sum() * float("nan"), {}

    objective = Objective(lambda b: [ModelPass({"input_ids": torch.ones(2, 3)}, nan_loss)], target="targets")
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, 10)
    before = [p.detach().clone() for p in model.parameters()]
    m = train_step(model, opt, sched, [Batch()], objective, 1.0)
    assert m["skipped"] == 1.0 and math.isnan(m["loss"])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert opt.state == {} or all(not s for s in opt.state.values())
    assert sched.last_epoch == 0 and all(p.grad is None for p in model.parameters())


def test_config_refuses_non_finite_and_negative_numbers_naming_the_key(capsys):
    for bad, key in (("optim.lr=inf", "optim.lr=inf"), ("optim.lr=-1", "optim.lr=-1"), ("optim.lr=nan", "optim.lr=nan"),
                     ("optim.grad_clip=nan", "optim.grad_clip=nan"), ("optim.weight_decay=-0.1", "optim.weight_decay"),
                     ("parallel.timeout_s=0", "parallel.timeout_s=0")):
        assert main(["config", "show", "configs/sft_tiny.yaml", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and key in err, err


# ---------------------------------------------------------------------------------------------- 3. damaged files


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    assert _sft(tmp_path / "straight", "trainer.max_steps=6") == 0
    assert _sft(tmp_path / "run", "trainer.max_steps=6", "trainer.stop_after=4", "trainer.save_every=2") == 0
    ckpts = tmp_path / "run" / "checkpoints" / "sft"
    latest = ckpts / "step_00000004"
    shard = next(latest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # truncated
    (ckpts / "step_00000002.tmp").mkdir()  # a save killed earlier
    with pytest.warns(UserWarning, match=r"cannot resume from .*step_00000004"):
        assert _sft(tmp_path / "run", "trainer.max_steps=6", "trainer.save_every=2") == 0
    assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")  # resumed from step 2, bit for bit
    assert not list(ckpts.glob("*.tmp"))


def test_empty_progress_record_and_damaged_metrics_line(tmp_path):
    assert _sft(tmp_path / "straight", "trainer.max_steps=6") == 0
    assert _sft(tmp_path / "run", "trainer.max_steps=6", "trainer.stop_after=4", "trainer.save_every=2") == 0
    (tmp_path / "run" / "checkpoints" / "sft" / "step_00000004" / "progress.json").write_text("")
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "sft", "step": 5, "lo')  # cut short by a kill
    with pytest.warns(UserWarning, match=r"metrics.jsonl:\d+: dropped a damaged metrics line"):
        assert _sft(tmp_path / "run", "trainer.max_steps=6", "trainer.save_every=2") == 0
    assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")


# ---------------------------------------------------------------------------------------------- 4. full disk


def test_full_disk_is_one_line_naming_the_path_and_leaves_no_tmp(tmp_path, monkeypatch, capsys):
    import shutil

    from rlhf_engine.parallel import checkpoint

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=1024))
    rc = _sft(tmp_path, "trainer.max_steps=2", "trainer.save_every=1")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and "not enough space for a checkpoint in" in err and str(tmp_path) in err and "MiB" in err
    assert not list((tmp_path / "checkpoints" / "sft").glob("*.tmp"))


# ---------------------------------------------------------------------------------------------- 7, 8. resume


def test_incompatible_resume_is_one_line_and_keeps_the_recorded_config(tmp_path, capsys):
    assert _sft(tmp_path, "trainer.max_steps=4", "trainer.stop_after=2", "trainer.save_every=2") == 0
    recorded = (tmp_path / "config.yaml").read_text()
    rc = _sft(tmp_path, "trainer.max_steps=4", "model.architecture.hidden_size=32")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and "cannot resume from any checkpoint" in err and "step_00000002" in err
    assert "trainer.resume=never" in err
    assert (tmp_path / "config.yaml").read_text() == recorded


def test_kill_between_final_evaluation_and_export_does_not_duplicate_records(tmp_path):
    assert _sft(tmp_path, "trainer.max_steps=4", "trainer.save_every=4") == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    before = _records(tmp_path)
    (tmp_path / "summary.json").unlink()  # as if killed after the final evaluation, before the export
    assert _sft(tmp_path, "trainer.max_steps=4", "trainer.save_every=4") == 0
    after = [r for r in _records(tmp_path) if "resumed_from" not in r]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]  # noqa: E731
    assert strip(after) == strip(before)
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["eval_loss_initial"] == summary["eval_loss_initial"] is not None


# ---------------------------------------------------------------------------------------------- 5, 9. signals


def _run_until(tmp_path: Path, out: Path, sig: int, after_step: int, *extra: str) -> tuple[int, str]:
    """Start the CLI, send ``sig`` once it has logged ``after_step``; returns (exit code, stderr)."""
    cmd = [sys.executable, "-m", "rlhf_engine", "sft", "--config", "configs/sft_tiny.yaml", *TINY,
           f"trainer.out_dir={out}", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")]),
           "RLHF_ENGINE_STOP_MARKER": str(tmp_path / "stopped")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if f"step={after_step} loss=" in line:
            proc.send_signal(sig)
            break
    _, rest = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + rest


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_exits_75_and_resumes_bit_exact(tmp_path):
    assert _sft(tmp_path / "straight", "trainer.max_steps=8") == 0
    rc, err = _run_until(tmp_path, tmp_path / "run", signal.SIGTERM, 2, "trainer.max_steps=8")
    assert rc == 75, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped: stopped by SIGTERM after step") and "run the same command again" in last
    assert "Traceback" not in err
    assert "stopped by SIGTERM" in (tmp_path / "stopped").read_text()  # the sbatch script requeues on it
    assert _sft(tmp_path / "run", "trainer.max_steps=8") == 0
    assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_130_with_a_checkpoint(tmp_path):
    rc, err = _run_until(tmp_path, tmp_path / "run", signal.SIGINT, 1, "trainer.max_steps=50")
    assert rc == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("stopped: stopped by SIGINT") and "Traceback" not in err
    assert list((tmp_path / "run" / "checkpoints" / "sft").glob("step_*"))


# ---------------------------------------------------------------------------------------------- 1. a stopped rank


STUCK = """
import os, signal, sys, time
import torch, torch.distributed as dist
from rlhf_engine.config import load_config
from rlhf_engine.parallel.runtime import init_runtime

rt = init_runtime(load_config(sys.argv[1], ["parallel.timeout_s=5", "parallel.dp_shard=2"]))
pids = [None, None]
dist.all_gather_object(pids, os.getpid())  # both ranks answer once
if rt.rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)  # stops answering, as a hung node does
start = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
except Exception as exc:
    print(f"rank 0 gave up after {time.monotonic() - start:.0f}s: {' '.join(str(exc).split())[:200]}", flush=True)
    os.kill(pids[1], signal.SIGKILL)  # what the launcher does to a stopped worker, sooner
    os._exit(3)
"""


@pytest.mark.dist
def test_a_stopped_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    """parallel.timeout_s reaches every collective: with one of two ranks stopped (SIGSTOP), the other exits
    non-zero with the timeout's message instead of waiting (torch's default is 30 minutes)."""
    script = tmp_path / "stuck.py"
    script.write_text(STUCK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(ROOT / "configs/sft_tiny.yaml")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 0 gave up after" in out and "timed out" in out.lower(), out[-3000:]
