"""Launchers: the SFT stage under scripts/torchrun.sh (gloo) reproduces the single-process run, and the
Slurm script renders the multi-node torchrun command."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from rlhf_engine.config import load_config
from rlhf_engine.stages.sft import run_sft

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.architecture.hidden_size=64", "model.architecture.intermediate_size=128", "model.architecture.num_layers=2",
        "model.architecture.num_heads=4", "model.architecture.num_kv_heads=2", "data.builtin_rows=300",
        "data.seq_len=128", "trainer.micro_batch_size=2", "trainer.max_steps=6", "trainer.eval_batches=2",
        "logging.log_every=1", "optim.warmup_steps=0"]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.dp_shard=2"]],
                         ids=["tp2_sp", "fsdp2"])
def test_sft_under_torchrun_matches_single_process(tmp_path, layout):
    # One process with 2 micro-batches per step sees the same data as 2 data-parallel ranks with 1 each.
    dp = 2 if "parallel.dp_shard=2" in layout else 1
    single = run_sft(load_config(ROOT / "configs/sft_tiny.yaml",
                                 TINY + [f"trainer.out_dir={tmp_path / 'single'}", "trainer.grad_accum_steps=2"]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [str(ROOT / "scripts/torchrun.sh"), "2", "sft", "--config", "configs/sft_tiny.yaml", *TINY, *layout,
         f"trainer.out_dir={tmp_path / 'dist'}", f"trainer.grad_accum_steps={2 // dp}",
         f"model.tokenizer_path={tmp_path / 'single' / 'tokenizer'}"],  # the same vocabulary
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "dist" / "summary.json").read_text())
    assert summary["world_size"] == 2
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "dist")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    assert abs(summary["eval_loss_final"] - single["eval_loss_final"]) <= 1e-5
    assert (tmp_path / "dist" / "hf" / "model.safetensors").exists()


PREF_TINY = ["model.architecture.hidden_size=64", "model.architecture.intermediate_size=128",
             "model.architecture.num_layers=3", "model.architecture.num_heads=4", "model.architecture.num_kv_heads=2",
             "data.seq_len=128", "trainer.micro_batch_size=3", "trainer.max_steps=4", "trainer.eval_batches=2",
             "trainer.eval_every=0", "trainer.save_every=0", "logging.log_every=1", "optim.warmup_steps=0",
             "logging.tensorboard=false"]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("command,recipe,layout", [
    ("dpo", "configs/dpo_tiny.yaml", ["parallel.dp_shard=2"]),
    ("rm", "configs/rm_tiny.yaml", ["parallel.tp=2", "parallel.sequence_parallel=true"]),
], ids=["dpo_fsdp2", "rm_tp2_sp"])
def test_preference_stages_under_torchrun_match_single_process(tmp_path, command, recipe, layout):
    """Roles over a shared trunk (DPO) under FSDP2 and a score model (RM) under TP+SP reproduce one process."""
    from rlhf_engine.cli import main

    dp = 2 if "parallel.dp_shard=2" in layout else 1
    assert main([command, "--config", recipe, *PREF_TINY, f"trainer.out_dir={tmp_path / 'single'}",
                 "trainer.grad_accum_steps=2"]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [str(ROOT / "scripts/torchrun.sh"), "2", command, "--config", recipe, *PREF_TINY, *layout,
         f"trainer.out_dir={tmp_path / 'dist'}", f"trainer.grad_accum_steps={2 // dp}",
         f"model.tokenizer_path={tmp_path / 'single' / 'tokenizer'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "dist")
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    assert (tmp_path / "dist" / "hf" / "model.safetensors").exists()


def test_slurm_script_renders_multinode_torchrun(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    (fake / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8", "RLHF_ENGINE_DRY_RUN": "1"}
    out = subprocess.run(["bash", str(ROOT / "scripts/slurm/rlhf.sbatch"), "sft", "--config", "configs/sft_tiny.yaml",
                          "parallel.tp=8"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "srun", "--kill-on-bad-exit=1", "torchrun", "--nnodes=2", "--nproc_per_node=8", "--rdzv_id=4242",
        "--rdzv_backend=c10d", "--rdzv_endpoint=gpu-node-07:29500", "-m", "rlhf_engine", "sft", "--config",
        "configs/sft_tiny.yaml", "parallel.tp=8"]
