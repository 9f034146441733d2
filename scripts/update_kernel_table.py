"""Regenerate the resource table of docs/kernels.md: every Triton launch compiled ahead of time.

    python scripts/update_kernel_table.py        # needs no GPU; about 15 s on 2 cores

Runs ``python -m rlhf_kernels.aot --markdown`` (without TRITON_INTERPRET) and replaces the block between
the ``<!-- aot:table -->`` markers of docs/kernels.md, stamping the Triton version it was compiled with.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "kernels.md"
BEGIN, END = "<!-- aot:table -->", "<!-- /aot:table -->"


def main() -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "rlhf_kernels.aot", "--markdown"], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        return proc.returncode
    import triton

    table = f"Compiled with Triton {triton.__version__} (ptxas from its wheel); regenerate with " \
            f"`python scripts/update_kernel_table.py`.\n\n{proc.stdout.strip()}"
    text = DOC.read_text()
    if BEGIN not in text:
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} block")
    text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: f"{BEGIN}\n{table}\n{END}", text, flags=re.S)
    DOC.write_text(text)
    print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
