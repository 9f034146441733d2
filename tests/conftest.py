"""Test-wide set-up: Triton's interpreter without a GPU, markers, thread limits.

Markers (see pyproject.toml): ``gpu`` tests are skipped without CUDA; ``dist`` tests launch several
processes under torchrun on gloo (through ``torchrun_helper.torchrun``); ``slow`` tests take more than
a few seconds on a 2-core CPU (deselect with ``-m "not slow"``).
"""

import os

import torch

# Must happen before anything imports triton: without a GPU only the interpreter works.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    yield
