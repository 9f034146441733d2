"""The multi-process harness itself: collectives work on gloo, and a failing rank fails the test with its output."""

import pytest
import torch
import torch.distributed as dist

from torchrun_helper import torchrun


def _all_reduce_sum():
    world = dist.get_world_size()
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    assert world == 2 and t.item() == 3.0, t


def _rank1_fails():
    if dist.get_rank() == 1:
        raise RuntimeError("deliberate failure on rank 1")


@pytest.mark.dist
def test_collectives_run_under_torchrun():
    torchrun(_all_reduce_sum, nproc=2)


@pytest.mark.dist
def test_failure_surfaces_child_output():
    with pytest.raises(AssertionError, match="deliberate failure on rank 1"):
        torchrun(_rank1_fails, nproc=2, timeout=120)
