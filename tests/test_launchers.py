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


FP8 = ["precision.fp8.backend=torchao"]
LORA = ["model.lora.rank=4", "model.lora.alpha=8", "optim.lr=1e-2"]
SFT_LAYOUTS = {  # id: (layout overrides, overrides of both runs, loss tolerance)
    "tp2_sp": (["parallel.tp=2", "parallel.sequence_parallel=true"], [], 1e-5),
    "fsdp2": (["parallel.dp_shard=2"], [], 1e-5),
    # torchao float8 (tensor-wise): the same scales as one process, so equal up to fp32 summation order
    "tp2_sp_fp8": (["parallel.tp=2", "parallel.sequence_parallel=true"], FP8, 1e-4),
    "fsdp2_fp8_all_gather": (["parallel.dp_shard=2", "precision.fp8.float8_all_gather=true"], FP8, 1e-4),
    # sft_tiny ties its embeddings: the first stage's embedding and the last stage's LM-head copy sum grads
    "pp2_tied": (["parallel.pp=2"], [], 1e-5),
}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout_id", list(SFT_LAYOUTS))
def test_sft_under_torchrun_matches_single_process(tmp_path, layout_id):
    layout, both, tol = SFT_LAYOUTS[layout_id]
    if both:
        pytest.importorskip("torchao")
    # One process with 2 micro-batches per step sees the same data as 2 data-parallel ranks with 1 each.
    dp = 2 if "parallel.dp_shard=2" in layout else 1
    single = run_sft(load_config(ROOT / "configs/sft_tiny.yaml",
                                 TINY + both + [f"trainer.out_dir={tmp_path / 'single'}", "trainer.grad_accum_steps=2"]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [str(ROOT / "scripts/torchrun.sh"), "2", "sft", "--config", "configs/sft_tiny.yaml", *TINY, *both, *layout,
         f"trainer.out_dir={tmp_path / 'dist'}", f"trainer.grad_accum_steps={2 // dp}",
         f"model.tokenizer_path={tmp_path / 'single' / 'tokenizer'}"],  # the same vocabulary
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "dist" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert proc.stdout.count('"world_size"') == 1  # the summary is printed once, not once per process
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "dist")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) <= tol, (a, b)
    assert abs(summary["eval_loss_final"] - single["eval_loss_final"]) <= tol
    assert (tmp_path / "dist" / "hf" / "model.safetensors").exists()
    if "parallel.pp=2" in layout:  # the export gathers both stages: the same checkpoint as one process
        _same_weights(tmp_path / "single" / "hf", tmp_path / "dist" / "hf")
    if both:  # the float8 layers are reported by every layout
        fp8 = [r["fp8/layers"] for r in map(json.loads, (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines())
               if "loss" in r]
        assert fp8 == [14.0] * 6, fp8


def _same_weights(a: Path, b: Path, tol: float = 1e-5) -> None:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(x) == set(y), sorted(set(x) ^ set(y))
    assert all((x[k] - y[k]).abs().max() <= tol for k in x), [k for k in x if (x[k] - y[k]).abs().max() > tol]


PREF_TINY = ["model.architecture.hidden_size=64", "model.architecture.intermediate_size=128",
             "model.architecture.num_layers=3", "model.architecture.num_heads=4", "model.architecture.num_kv_heads=2",
             "data.seq_len=128", "trainer.micro_batch_size=3", "trainer.max_steps=4", "trainer.eval_batches=2",
             "trainer.eval_every=0", "trainer.save_every=0", "logging.log_every=1", "optim.warmup_steps=0",
             "logging.tensorboard=false"]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("command,recipe,layout,both", [
    ("dpo", "configs/dpo_tiny.yaml", ["parallel.dp_shard=2"], []),
    ("rm", "configs/rm_tiny.yaml", ["parallel.tp=2", "parallel.sequence_parallel=true"], []),
    ("dpo", "configs/dpo_tiny.yaml", ["parallel.pp=2"], []),  # 3 layers on 2 stages: an uneven split
    ("rm", "configs/rm_tiny.yaml", ["parallel.pp=2", "parallel.pp_schedule=gpipe"], []),
    ("dpo", "configs/dpo_tiny.yaml", ["parallel.dp_shard=2"], LORA),
    ("dpo", "configs/dpo_tiny.yaml", ["parallel.pp=2"], LORA),
], ids=["dpo_fsdp2", "rm_tp2_sp", "dpo_pp2", "rm_pp2_gpipe", "lora_dpo_fsdp2", "lora_dpo_pp2"])
def test_preference_stages_under_torchrun_match_single_process(tmp_path, command, recipe, layout, both):
    """Roles over a shared trunk (DPO) under FSDP2 and a score model (RM) under TP+SP reproduce one process;
    so does DPO with LoRA adapters (the reference: the policy with its adapters off) under FSDP2 and PP."""
    from rlhf_engine.cli import main

    dp = 2 if "parallel.dp_shard=2" in layout else 1
    assert main([command, "--config", recipe, *PREF_TINY, *both, f"trainer.out_dir={tmp_path / 'single'}",
                 "trainer.grad_accum_steps=2"]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [str(ROOT / "scripts/torchrun.sh"), "2", command, "--config", recipe, *PREF_TINY, *both, *layout,
         f"trainer.out_dir={tmp_path / 'dist'}", f"trainer.grad_accum_steps={2 // dp}",
         f"model.tokenizer_path={tmp_path / 'single' / 'tokenizer'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "dist")
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    assert (tmp_path / "dist" / "hf" / "model.safetensors").exists()
    if "parallel.pp=2" in layout:
        _same_weights(tmp_path / "single" / "hf", tmp_path / "dist" / "hf")
        if command == "rm":  # InstructGPT's normalisation: the mean score, computed through the pipeline
            shift = [json.loads((tmp_path / run / "summary.json").read_text())["normalization_shift"]
                     for run in ("single", "dist")]
            assert abs(shift[0] - shift[1]) <= 1e-5, shift


RL_TINY = """
model:
  architecture: {vocab_size: 512, hidden_size: 64, intermediate_size: 128, num_layers: 3, num_heads: 4,
                 num_kv_heads: 2, max_position_embeddings: 256}
  trunk_layers: 1
data: {seq_len: 96, builtin_rows: 200, eval_fraction: 0.05}
optim: {lr: 3.0e-3, schedule: constant}
algorithm:
  name: ppo
  rl: {prompts_per_rollout: 4, group: 2, epochs: 2, kl_coef: 0.05, eval_prompts: 4}
rollout: {max_new_tokens: 10}
reward: {functions: {no_repetition: 1.0}, length_target: 4, length_weight: 1.0}
trainer: {max_steps: 4, micro_batch_size: 4, eval_every: 0}
logging: {log_every: 1, progress_bar: false, tensorboard: false}
"""


def _records(run: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.mark.dist
@pytest.mark.slow
def test_ppo_iteration_under_tp2_matches_single_process_and_runs_under_fsdp2(tmp_path):
    """One PPO iteration (a rollout, two epochs of two steps) under TP2 equals one process: generation,
    scoring, advantages and updates. Under FSDP2 each rank collects its own share of the rollout (so the
    numbers differ from one process by design); the run completes with decoding kept in lockstep."""
    from rlhf_engine.cli import main

    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(RL_TINY)
    assert main(["rl", "--config", str(recipe), f"trainer.out_dir={tmp_path / 'single'}"]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])}
    for name, layout in (("tp2", ["parallel.tp=2"]), ("fsdp2", ["parallel.dp_shard=2"])):
        proc = subprocess.run(
            [str(ROOT / "scripts/torchrun.sh"), "2", "rl", "--config", str(recipe), *layout,
             f"trainer.out_dir={tmp_path / name}", f"model.tokenizer_path={tmp_path / 'single' / 'tokenizer'}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert (tmp_path / name / "hf" / "model.safetensors").exists()
    for key in ("loss", "grad_norm", "rollout/reward", "rollout/kl", "value_loss", "clip_fraction"):
        a, b = _records(tmp_path / "single", key), _records(tmp_path / "tp2", key)
        assert len(a) == len(b) > 0, key
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (key, a, b)
    losses = _records(tmp_path / "fsdp2", "loss")
    assert len(losses) == 4 and all(x == x for x in losses)
    summary = json.loads((tmp_path / "fsdp2" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"]


RL_PP = RL_TINY.replace("num_layers: 3", "num_layers: 4").replace("trunk_layers: 1", "trunk_layers: 2") \
    .replace("max_steps: 4", "max_steps: 3")


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("algorithm,lora", [("ppo", False), ("grpo", False), ("ppo", True)],
                         ids=["ppo", "grpo", "ppo_lora"])
def test_rl_under_pipeline_parallelism_matches_one_process(tmp_path, algorithm, lora):
    """Online RL with the update, the experience pass and generation under pipeline parallelism: PPO
    (critic, shared trunk k=2) and GRPO under tp2 x pp2 reproduce one process (generation on the policy
    gathered whole per rank, the experience forward and the updates through the stages); pp4 runs. With
    LoRA (attention, MLP and LM head; the reference: the policy with its adapters off) too."""
    from rlhf_engine.cli import main

    recipe = tmp_path / "rl.yaml"
    recipe.write_text(RL_PP)
    both = [f"algorithm.name={algorithm}"] + (["algorithm.rl.group=4"] if algorithm == "grpo" else [])
    if lora:
        both += [*LORA, "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"]
    assert main(["rl", "--config", str(recipe), *both, f"trainer.out_dir={tmp_path / 'single'}"]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])}
    layouts = {"tp2_pp2": ["parallel.tp=2", "parallel.pp=2"]}
    if algorithm == "ppo" and not lora:
        layouts["pp4"] = ["parallel.pp=4"]
    for name, layout in layouts.items():
        proc = subprocess.run(
            [str(ROOT / "scripts/torchrun.sh"), "4", "rl", "--config", str(recipe), *both, *layout,
             f"trainer.out_dir={tmp_path / name}", f"model.tokenizer_path={tmp_path / 'single' / 'tokenizer'}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert (tmp_path / name / "hf" / "model.safetensors").exists()
        keys = ["loss", "grad_norm", "rollout/reward", "rollout/kl"] + (["value_loss"] if algorithm == "ppo" else [])
        for key in keys:
            a, b = _records(tmp_path / "single", key), _records(tmp_path / name, key)
            assert len(a) == len(b) > 0, key
            assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-3, (name, key, a, b)
    summary = json.loads((tmp_path / "tp2_pp2" / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["finished"]
    single = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert summary["samples"] == single["samples"] and single["samples"]  # the same sampled tokens, decoded


OFF_POLICY = ["algorithm.name=grpo", "algorithm.rl.group=4", "algorithm.rl.epochs=1", "algorithm.rl.off_policy_steps=1",
              "algorithm.rl.is_correction=tis", "trainer.micro_batch_size=4", "trainer.grad_accum_steps=2",
              # rewards that differ within groups from the first rollout on (a random model's samples), so that
              # the first steps move the weights and the next rollouts' behaviour policy is measurably older
              "reward.functions={no_repetition: 1.0, single_line: 1.0}", "rollout.max_new_tokens=24", "trainer.seed=1",
              "trainer.max_steps=6"]


@pytest.mark.dist
@pytest.mark.slow
def test_off_policy_grpo_under_tp2_pp2_matches_one_process_and_runs_under_fsdp2(tmp_path):
    """algorithm.rl.off_policy_steps=1 on several ranks: each rank gathers the policy whole (tensor and
    pipeline shards by collectives, in step) and samples the next rollout with it in the background.
    Under tp2 x pp2 the run equals one process (three rollouts, two steps each: the sampled tokens, the
    stale behaviour log-probs and their tis weights); under FSDP2 each rank samples its own share, the
    first rollout by the sharded model itself (mismatch 0), later ones by the older copy (mismatch > 0),
    here in a sampler process per rank."""
    from rlhf_engine.cli import main

    recipe = tmp_path / "rl.yaml"
    recipe.write_text(RL_PP)
    assert main(["rl", "--config", str(recipe), *OFF_POLICY, f"trainer.out_dir={tmp_path / 'single'}"]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])}
    layouts = (("tp2_pp2", 4, ["parallel.tp=2", "parallel.pp=2"]),  # the thread sampler
               ("fsdp2", 2, ["parallel.dp_shard=2", "algorithm.rl.off_policy_sampler=process"]))  # a child per rank
    for name, nproc, layout in layouts:
        proc = subprocess.run(
            [str(ROOT / "scripts/torchrun.sh"), str(nproc), "rl", "--config", str(recipe), *OFF_POLICY, *layout,
             f"trainer.out_dir={tmp_path / name}", f"model.tokenizer_path={tmp_path / 'single' / 'tokenizer'}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["world_size"] == nproc and summary["finished"]
    for key in ("loss", "grad_norm", "rollout/reward", "rollout/kl", "rollout/mismatch_abs_mean", "rollout/mismatch_kl"):
        a, b = _records(tmp_path / "single", key), _records(tmp_path / "tp2_pp2", key)
        assert len(a) == len(b) > 0, key
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-3, (key, a, b)
    single = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert json.loads((tmp_path / "tp2_pp2" / "summary.json").read_text())["samples"] == single["samples"]
    stale = _records(tmp_path / "single", "rollout/mismatch_abs_mean")
    assert len(stale) == 3 and stale[0] <= 1e-5 and min(stale[1:]) > 1e-3  # rollouts 1, 2: the older policy's
    # FSDP2, one step per rollout: rollout r was sampled at the weights before step r, which trained on
    # rollout r - 1; it is stale exactly when that step moved the weights (no gradient: a group of equal rewards)
    fsdp, moved = _records(tmp_path / "fsdp2", "rollout/mismatch_abs_mean"), _records(tmp_path / "fsdp2", "grad_norm")
    assert len(fsdp) == len(moved) == 6 and fsdp[0] <= 1e-5 and any(g > 1e-3 for g in moved[:5]), (fsdp, moved)
    for r in range(1, 6):
        assert (fsdp[r] > 1e-3) == (moved[r - 1] > 1e-6), (r, fsdp, moved)
    assert len(_records(tmp_path / "fsdp2", "rollout/sampler_peak_mem_mb")) == 5  # rollouts 1-5 came from the child


@pytest.mark.dist
@pytest.mark.slow
def test_ppo_3d_tiny_runs_on_8_ranks(tmp_path):
    """The 175B recipe's layout kinds reduced in width: tp2 x pp2 x FSDP2, a 3/4 frozen trunk, PPO with a
    critic: generate, score and update on 8 gloo ranks, exactly the README's command."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([str(ROOT / "scripts/torchrun.sh"), "8", "rl", "--config", "configs/ppo_3d_tiny.yaml",
                           f"trainer.out_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 8 and summary["finished"] and summary["steps"] == 2
    losses, memory = _records(tmp_path, "loss"), _records(tmp_path, "peak_mem_mb_max_rank")
    assert len(losses) == 2 and all(x == x for x in losses) and len(memory) == 2
    assert (tmp_path / "hf" / "model.safetensors").exists()


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
