"""The training stages, each a ``run_*(cfg) -> summary`` over the skeleton of ``common.run_stage``.

``runner(name)`` finds the stage that trains an algorithm (``catalog.command_of``); stages are named by
import path and imported on first use, so the command line starts without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from ..catalog import command_of

RUNNERS = {"sft": "rlhf_engine.stages.sft:run_sft", "rm": "rlhf_engine.stages.reward:run_reward_model",
           "dpo": "rlhf_engine.stages.dpo:run_dpo", "rl": "rlhf_engine.stages.rl:run_rl"}


def runner(algorithm: str) -> Callable[[Any], dict[str, Any]]:
    """The ``run_*`` function of the stage that trains ``algorithm``."""
    module, _, fn = RUNNERS[command_of(algorithm)].partition(":")
    return getattr(importlib.import_module(module), fn)
