"""Kill -9 drill: kill a training run at a random moment (mid-step, mid-save, mid-evaluation), rerun the same
command, and check that it resumed and ended bit for bit where an uninterrupted run ends.

    python scripts/fault_drill.py --trials 10 [--stage sft|grpo|both] [--seed 0]

Prints, per stage: trials, resumed (the rerun continued from a checkpoint), bit_exact (its per-step
losses equal the uninterrupted run's), corrupt (a checkpoint listed as complete that cannot be loaded),
and writes benchmarks/results/fault_drill.csv. CPU, tiny models; about 20 s a trial on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["model.architecture.hidden_size=64", "model.architecture.intermediate_size=128",
          "model.architecture.num_heads=4", "model.architecture.num_kv_heads=2", "logging.log_every=1",
          "logging.tensorboard=false", "logging.progress_bar=false", "trainer.save_every=1", "trainer.keep_checkpoints=2"]
STAGES = {
    "sft": ["sft", "--config", "configs/sft_tiny.yaml", *COMMON, "model.architecture.num_layers=2",
            "data.builtin_rows=300", "data.seq_len=128", "trainer.micro_batch_size=2", "trainer.max_steps=12",
            "trainer.eval_every=4", "trainer.eval_batches=2", "optim.warmup_steps=0"],
    "grpo": ["rl", "--config", "configs/ppo_3d_tiny.yaml", *COMMON, "parallel.tp=1", "parallel.pp=1",
             "parallel.dp_shard=1", "algorithm.name=grpo", "algorithm.rl.group=2", "algorithm.rl.epochs=2",
             "trainer.max_steps=6", "trainer.grad_accum_steps=1"],
}


def run(args: list[str], out: Path, kill_after: float | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_engine", *args, f"trainer.out_dir={out}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kill_after is None:
        return proc.wait()
    try:
        return proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return -9


def losses(out: Path, stage: str) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r and r.get("stage") == stage]


def corrupt_checkpoints(out: Path) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from rlhf_engine.parallel.checkpoint import complete_checkpoints

    bad = 0
    for stage_dir in (out / "checkpoints").glob("*"):
        for ckpt in complete_checkpoints(stage_dir):
            try:
                meta = FileSystemReader(str(ckpt)).read_metadata()
                import torch

                state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.state_dict_metadata.items()
                         if hasattr(v, "size")}
                dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
            except BaseException:  # noqa: BLE001 (DCP raises a BaseException)
                bad += 1
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--stage", choices=["sft", "grpo", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fault_drill.csv")
    a = parser.parse_args()
    rng = random.Random(a.seed)
    rows = []
    for stage in (["sft", "grpo"] if a.stage == "both" else [a.stage]):
        name = "sft" if stage == "sft" else "grpo"
        with tempfile.TemporaryDirectory() as tmp:
            straight = Path(tmp) / "straight"
            t0 = time.perf_counter()
            assert run(STAGES[stage], straight) == 0, f"{stage}: the uninterrupted run failed"
            duration = time.perf_counter() - t0
            want = losses(straight, name)
            counts = {"stage": stage, "trials": 0, "killed": 0, "resumed": 0, "bit_exact": 0, "corrupt": 0}
            for trial in range(a.trials):
                out = Path(tmp) / f"trial{trial}"
                rc = run(STAGES[stage], out, kill_after=rng.uniform(0.3, 0.95) * duration)
                counts["trials"] += 1
                counts["killed"] += rc == -9
                counts["corrupt"] += corrupt_checkpoints(out)
                rerun = run(STAGES[stage], out)
                text = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else ""
                counts["resumed"] += rerun == 0 and '"resumed_from"' in text
                counts["bit_exact"] += rerun == 0 and losses(out, name) == want
            rows.append(counts)
            print(counts, flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
