"""What the benchmarks share: peak memory (CUDA allocator peak on GPU, the resident-set high-water
mark VmHWM, reset through /proc/self/clear_refs, on CPU; MB above the starting level) and CSV output."""

from __future__ import annotations

import csv
import gc
import os
import re
import sys
from pathlib import Path

import torch


def pin_malloc_threshold() -> None:
    """Re-exec with a fixed glibc mmap threshold: otherwise freed large blocks raise the threshold and
    later temporaries come from already-resident heap pages, hidden from the RSS high-water mark."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})


def _cpu_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak`` (MB above the level at entry)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _cpu_mb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20 - self.base
        else:
            self.peak = _cpu_mb("VmHWM") - self.base


def write_csv(rows: list[dict], out: Path) -> None:
    """Write ``rows`` (dicts with the same keys) to ``out`` with a header, and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
