"""Every Triton launch compiled ahead of time for sm_90 (H100/H200) and sm_80 (A100), without a GPU.

``python -m rlhf_kernels.aot`` plans each launch with the launchers' own code (the ``launch`` table,
the vocabulary-split rule, backward chunking) at the benchmark shape N=16384, H=4096, V=128256 and at
its tp=8 shard, compiles it with Triton's real compiler for each target, and reports ptxas' registers
and spills, the shared memory per block and the matrix instruction. It runs once per session in a
subprocess without TRITON_INTERPRET (which the rest of the suite sets, and which replaces the kernels
by interpreter objects).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from rlhf_kernels import launch as L

ARCHS = (90, 80)
DTYPES = ("bf16", "fp16", "fp32")
LM_HEAD_VARIANTS = {"fwd policy", "fwd reference", "fwd policy+ref", "dlogits", "dlogits +KL"}
SOFTCAP_VARIANTS = {"fwd policy+ref softcap", "dlogits +KL softcap"}  # Gemma 2's logit softcap, 16-bit dtypes


def _aot(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated so it does not warn
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "rlhf_kernels.aot", "--json", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    proc, data = _aot(tmp_path_factory.mktemp("aot"))
    return proc, data


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_launch_compiles_spill_free_within_shared_memory(compiled, arch, dtype):
    _, data = compiled
    reports = [r for r in data["reports"] if r["arch"] == arch and r["dtype"] == dtype]
    labels = {r["label"] for r in reports}
    assert LM_HEAD_VARIANTS | (SOFTCAP_VARIANTS if dtype != "fp32" else set()) <= labels, labels
    assert any(lbl.startswith("ppo") for lbl in labels)
    if dtype == "fp32":
        assert "gae" in labels
    limit = L.ARCHS[L.arch_family(arch)].max_shared_bytes
    for r in reports:
        where = f"{r['kernel']} [{r['label']}]"
        assert r["error"] == "", where + ": " + r["error"]
        assert r["registers"] > 0, where
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, where
        assert r["shared_bytes"] <= limit, where
        # both shapes (benchmark and tp=8 shard) were planned, and merged only when they compile alike
        assert set(r["grids"]) == {"bench", "tp8"}, where


@pytest.mark.parametrize("arch,mma", [(90, "wgmma"), (80, "mma.sync")])
def test_16bit_gemms_use_the_intended_matrix_instruction(compiled, arch, mma):
    _, data = compiled
    gemms = [r for r in data["reports"] if r["arch"] == arch and r["kernel"] in ("_state_fwd_kernel", "_dlogits_kernel")]
    assert len(gemms) == 3 * len(LM_HEAD_VARIANTS) + 2 * len(SOFTCAP_VARIANTS)  # fp32, fp16, bf16; softcap 16-bit
    for r in gemms:
        assert r["mma"] == (mma if r["dtype"] in ("bf16", "fp16") else "fma"), (r["label"], r["dtype"])


def test_no_problems_reported_and_every_table_entry_compiled(compiled):
    proc, data = compiled
    assert proc.returncode == 0 and data["problems"] == [], data["problems"]
    seen = {(r["arch"], r["kernel"], r["constexprs"].get("BLOCK_N"), r["constexprs"].get("BLOCK_V"),
             r["constexprs"].get("BLOCK_H"), r["options"].get("num_warps"), r["options"].get("num_stages"))
            for r in data["reports"]}
    for (family, kernel, _, _), cfg in L.LM_HEAD.items():
        name = "_state_fwd_kernel" if kernel == "fwd" else "_dlogits_kernel"
        key = (L.ARCHS[family].capability, name, cfg.block_n, cfg.block_v, cfg.block_h, cfg.num_warps, cfg.num_stages)
        assert key in seen, key


def test_checker_rejects_a_config_whose_shared_memory_is_too_large(tmp_path):
    # 64 x 64 tiles with a K step of 256 and 6 stages: (64*256 + 256*64) * 2 B = 64 KiB a stage, ~320 KiB
    proc, data = _aot(tmp_path, "--fwd-config", "64,64,256,4,6", "--arch", "90")
    assert proc.returncode == 1
    (report,) = data["reports"]
    assert report["error"] == "" and report["shared_bytes"] > 227 * 1024
    assert len(data["problems"]) == 1 and "shared memory" in data["problems"][0] and "227 KiB" in data["problems"][0]


def test_checker_flags_spills_and_a_missing_matrix_instruction():
    from rlhf_kernels.aot import Report, check

    ok = Report("_state_fwd_kernel", "fwd policy", 90, "bf16", {}, {}, {}, 200, 0, 0, 96 * 1024, "wgmma")
    assert check(ok) == []
    spilled = Report(**{**ok.__dict__, "spill_stores": 16, "spill_loads": 8})
    assert "spills" in check(spilled)[0]
    no_mma = Report(**{**ok.__dict__, "mma": "fma"})
    assert "not wgmma" in check(no_mma)[0]
    # the sm80 family is held to 99 KiB (sm_86 / sm_89), below the A100's own 163 KiB
    big = Report(**{**ok.__dict__, "arch": 80, "mma": "mma.sync", "shared_bytes": 120 * 1024})
    assert "99 KiB" in check(big)[0]


def test_launch_plan_follows_the_table_and_the_split_rule():
    from rlhf_kernels.triton_lm_head import TritonImpl

    os.environ.pop("TRITON_INTERPRET", None)  # plan as on a GPU (the kernels stay interpreted objects)
    try:
        impl = TritonImpl(arch=90, sms=132)
        plan = impl.plan_forward(16384, 128256, 4096, torch.bfloat16, True, True, (4096,) * 4, 1.0)
        cfg = L.LM_HEAD[("sm90", "fwd", 2, "16bit")]
        assert (plan.constexprs["BLOCK_N"], plan.constexprs["BLOCK_V"], plan.constexprs["BLOCK_H"]) == (
            cfg.block_n, cfg.block_v, cfg.block_h)
        assert plan.options == {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        assert plan.constexprs["EVEN_H"] and plan.grid == (128, 1)
    finally:
        os.environ["TRITON_INTERPRET"] = "1"
    # wave efficiency: 128 token blocks fill 132 SMs at 97% already; 8 blocks need 16 slices (128 programs)
    one = L.LaunchConfig(128, 128, 64, 8, 4)
    assert L.vocab_splits(16384, 128256, one, 132) == 1
    assert L.vocab_splits(1024, 128256, one, 132) == 16
    assert L.vocab_splits(1024, 2048, one, 132) == 2  # never below 8 vocabulary tiles a slice
    with pytest.raises(ValueError, match="sm_80"):
        L.arch_family(75)


def test_gpu_check_script_is_executable_and_its_dry_run_prints_the_plan():
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"
    assert os.access(script, os.X_OK)
    proc = subprocess.run([str(script), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    plan = proc.stdout
    for step in ("-m gpu", "bench_linear_logprob.py --device cuda --dtype bfloat16 --n 16384 --hidden 4096 --vocab 128256",
                 "liger,cce", "bench_train_step.py", "bench_fp8.py", "bench_generate.py --modes eager,static,compiled",
                 "gpu_summary.py"):
        assert step in plan, step
