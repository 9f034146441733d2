"""Child side of torchrun_helper: init gloo, run one function from a test file, tear down.

After the body has passed on this rank (and every rank reached the barrier) the child prints
``PASSED_MARKER``, destroys the process group and leaves with ``os._exit``, skipping C++ static
destructors: a thread torn down at interpreter exit (gloo / c10d) occasionally aborts there
("terminate called without an active exception"), which says nothing about the code under test.
"""

import importlib.util
import os
import sys
from pathlib import Path
import traceback

import torch
import torch.distributed as dist


PASSED_MARKER = "__torchrun_body_passed__"


def main(test_file: str, name: str) -> int:
    dist.init_process_group("gloo")
    sys.path.insert(0, str(Path(test_file).parent))  # as pytest does: helpers beside the test file import
    try:
        spec = importlib.util.spec_from_file_location(f"_dist_test_{name}", test_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        torch.manual_seed(0)
        getattr(module, name)()
        dist.barrier()
        print(f"[rank {dist.get_rank()}] {PASSED_MARKER}", flush=True)
        return 0
    except BaseException:
        print(f"[rank {dist.get_rank()}] {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    code = main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
