"""The multi-process harness itself: collectives work on gloo, and a failing rank fails the test with its output."""

import os

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


def _abort_in_teardown():  # the body passes; tearing down the process group then aborts the process
    dist.destroy_process_group = lambda *args, **kwargs: os.abort()


def _fail_after_output():
    raise AssertionError("the body itself failed")


@pytest.mark.dist
def test_teardown_abort_after_a_passed_body_warns_but_body_failures_fail():
    with pytest.warns(RuntimeWarning, match="body passed on every rank, teardown exited"):
        torchrun(_abort_in_teardown, nproc=2, timeout=120)
    with pytest.raises(AssertionError, match="the body itself failed"):
        torchrun(_fail_after_output, nproc=2, timeout=120)
