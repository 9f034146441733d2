"""Run a test body on N processes under ``torchrun`` (gloo) and fail with the children's output.

    def _body():                 # module-level; runs on every rank with the process group initialised
        t = torch.ones(1) * dist.get_rank()
        dist.all_reduce(t)
        assert t.item() == 1

    @pytest.mark.dist
    def test_sum():
        torchrun(_body, nproc=2)

The body is found again in the child by its file and name, so it must be a module-level function.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
ENTRY = Path(__file__).with_name("_torchrun_entry.py")
PASSED_MARKER = "__torchrun_body_passed__"  # printed by _torchrun_entry once a rank's body has passed


def torchrun(body: Callable[[], None], nproc: int, *, timeout: float = 300.0, env: dict[str, str] | None = None) -> str:
    """Launch ``body`` on ``nproc`` ranks; returns the combined output, raises AssertionError on failure."""
    if "<locals>" in body.__qualname__:
        raise ValueError(f"{body.__qualname__} must be a module-level function")
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["OMP_NUM_THREADS"] = "1"  # N ranks share 2 cores
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "kernels"), str(ENTRY.parent), child_env.get("PYTHONPATH", "")]
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(ENTRY), body.__code__.co_filename, body.__name__,
    ]
    try:
        proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise AssertionError(f"torchrun {body.__name__} x{nproc} timed out after {timeout}s\n{out}") from None
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        passed_everywhere = all(f"[rank {r}] {PASSED_MARKER}" in output for r in range(nproc))
        if not passed_everywhere or " failed:" in output:
            raise AssertionError(f"torchrun {body.__name__} x{nproc} exited {proc.returncode}\n--- output ---\n{output}")
        # Every rank passed the body and the final barrier; only process teardown crashed.
        warnings.warn(f"torchrun {body.__name__} x{nproc}: body passed on every rank, teardown exited "
                      f"{proc.returncode}:\n{output[-1500:]}", RuntimeWarning, stacklevel=2)
    return output
