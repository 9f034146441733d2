"""The runtime's process-group lifetime: a run destroys the group it created (gloo's worker threads left to
interpreter exit can abort a finished rank), never one the embedding stack owns."""

import torch.distributed as dist

from rlhf_engine.parallel import runtime


def test_shutdown_destroys_only_the_process_group_the_runtime_created(monkeypatch):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        runtime.shutdown_runtime()  # created by the caller (a larger stack): kept
        assert dist.is_initialized()
        monkeypatch.setattr(runtime, "_OWN_PROCESS_GROUP", True)  # as init_runtime sets when it creates it
        runtime.shutdown_runtime()
        assert not dist.is_initialized()
        assert runtime._OWN_PROCESS_GROUP is False
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
