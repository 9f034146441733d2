"""Benchmark: token-budget packing + rank balancing in C++ (rlhf_engine._C) vs the same algorithm in Python,
and vs naive fixed-size padded micro-batches, side by side.

    python benchmarks/bench_packing.py [--sizes 10000 100000 1000000] [--budget 4096] [--ranks 8]

Sequence lengths are drawn from a log-normal (median 300 tokens, clipped to [1, budget]) with a fixed
seed, like mixed SFT/RL data. Rows:
- ``cpp``: first-fit decreasing into micro-batches of at most ``budget`` tokens, then balanced largest
  differencing across ``ranks`` (equal counts);
- ``python``: the identical algorithm in plain Python (``rlhf_engine.data.packer.*_python``; the tests
  check both give the same output);
- ``naive``: fixed micro-batches of budget // mean-length sequences in data order, each padded to its
  longest sequence, dealt to ranks round-robin (what a loader without packing does).
median_ms is over ``--repeats`` runs (one run for Python at >= 1M sequences); padding_fraction is
1 - real tokens / (micro-batches x tokens each); rank_imbalance is max rank load / mean - 1.
Writes benchmarks/results/packing_<device>.csv.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from _bench import write_csv

from rlhf_engine.data import packer


def naive(lengths: np.ndarray, budget: int, ranks: int) -> tuple[float, float]:
    mbs = max(1, budget // int(lengths.mean()))
    n = len(lengths) // mbs * mbs
    groups = lengths[:n].reshape(-1, mbs)
    padded = groups.max(axis=1) * mbs  # tokens each micro-batch occupies
    loads = np.zeros(ranks)
    np.add.at(loads, np.arange(len(padded)) % ranks, groups.sum(axis=1))
    return 1.0 - groups.sum() / padded.sum(), loads.max() / loads.mean() - 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--budget", type=int, default=4096)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n in args.sizes:
        lengths = np.clip(rng.lognormal(np.log(300), 0.9, size=n).astype(np.int64), 1, args.budget)
        as_list = lengths.tolist()
        for impl in ("cpp", "python"):
            repeats = 1 if impl == "python" and n >= 1_000_000 else args.repeats
            times, plan = [], None
            for _ in range(repeats):
                t = time.perf_counter()
                plan = packer.pack_and_balance(as_list, args.budget, args.ranks, impl=impl)
                times.append((time.perf_counter() - t) * 1e3)
            rows.append({"impl": impl, "n_sequences": n, "budget": args.budget, "median_ms": round(statistics.median(times), 2),
                         "padding_fraction": round(plan.padding_fraction, 4), "rank_imbalance": round(plan.rank_imbalance, 5)})
            print(rows[-1], flush=True)
        t = time.perf_counter()
        pad, imb = naive(lengths, args.budget, args.ranks)
        rows.append({"impl": "naive", "n_sequences": n, "budget": args.budget,
                     "median_ms": round((time.perf_counter() - t) * 1e3, 2), "padding_fraction": round(pad, 4),
                     "rank_imbalance": round(imb, 5)})
        print(rows[-1], flush=True)
        cpp, py = rows[-3]["median_ms"], rows[-2]["median_ms"]
        print(f"n={n}: C++ {py / cpp:.1f}x faster than Python; padding {rows[-3]['padding_fraction']:.2%} vs naive "
              f"{pad:.2%}", flush=True)
    write_csv(rows, Path(__file__).parent / "results" / "packing_cpu.csv")


if __name__ == "__main__":
    main()
