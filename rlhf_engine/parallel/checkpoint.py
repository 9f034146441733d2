"""Sharded checkpoints with torch.distributed.checkpoint: atomic, and loadable at another layout.

    save_checkpoint(run_dir / "checkpoints", step, model, optimizer, progress={"step": step, ...})
    path = latest_checkpoint(run_dir / "checkpoints")
    progress = load_checkpoint(path, model, optimizer)

Layout independence: model and optimizer state are saved as DTensors with global metadata, so a run
saved with tp=2 loads with tp=1, FSDP or another degree (DCP reshards on load). RNG states are saved
per rank and restored only when the world size is unchanged (a resharded run reseeds).

Atomicity: every rank writes into ``step_N.tmp``; after a barrier rank 0 writes ``progress.json`` and
renames the directory to ``step_N``, then rewrites ``latest`` (write-then-rename). A save killed at any
point leaves at most a ``*.tmp`` directory, which is never read, and the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..config.model import LoRAConfig
from ..faults import CheckpointError
from ..models import Transformer, save_hf_model
from ..models.lora import is_adapter, lora_modules, merge_lora_state, save_peft_adapters
from .pipeline import PipelinedModel

LATEST = "latest"
PROGRESS = "progress.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    progress: dict[str, Any] | None = None,
    rank_state: dict[str, Any] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns ``directory/step_<step>``. ``rank_state``: this rank's own
    extra state (e.g. an RL rollout buffer), saved with ``torch.save`` and read back by ``load_rank_state``."""
    directory = Path(directory)
    final = directory / f"step_{step:08d}"
    tmp = directory / f"step_{step:08d}.tmp"
    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("step_*.tmp"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state: dict[str, Any] = {"model": _saved_model_state(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    _check_space(directory, _local_bytes(state))
    try:
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        torch.save(_rng_state(), tmp / f"rng_rank{_rank():05d}.pt")
        if rank_state is not None:
            torch.save(rank_state, tmp / f"state_rank{_rank():05d}.pt")
    except BaseException as exc:  # a full disk: OSError, or DCP's CheckpointException (a BaseException)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(directory).free
        raise CheckpointError(f"writing checkpoint {tmp} failed ({' '.join(str(exc).split())[:200]}); "
                              f"{free / 2**20:.0f} MiB free there; the previous checkpoint is intact") from None
    _barrier()
    if _rank() == 0:
        meta = {"step": step, "world_size": _world(), **(progress or {})}
        (tmp / PROGRESS).write_text(json.dumps(meta, indent=2))
        _fsync_tree(tmp)  # rename-based atomicity survives a dead process; fsync makes it survive a node crash
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        pointer = directory / f".{LATEST}.tmp"
        pointer.write_text(final.name)
        _fsync_file(pointer)
        pointer.replace(directory / LATEST)
        _fsync_file(directory)
    _barrier()
    return final


def _saved_model_state(model: torch.nn.Module) -> dict[str, Any]:
    """What a checkpoint keeps of the model: everything, or with LoRA adapters only the parameters that
    train (the adapters and e.g. a score head): the frozen base is rebuilt from model.hf_path on resume."""
    state = get_model_state_dict(model)
    if next(lora_modules(model), None) is None:
        return state
    trainable = {_clean(n) for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trainable or is_adapter(k)}


def _clean(name: str) -> str:
    """A parameter name without the wrappers' infixes (activation checkpointing, FSDP1), as DCP writes it."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_fsdp_wrapped_module.", "")


def _local_bytes(state: Any) -> int:
    """Bytes of this rank's tensors in a (nested) state dict (local shards of DTensors)."""
    if isinstance(state, dict):
        return sum(_local_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_local_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


def _check_space(directory: Path, local_bytes: int) -> None:
    """Refuse a save that cannot fit (every rank's share, plus 5%), before writing anything."""
    need = torch.tensor([float(local_bytes)], dtype=torch.float64)
    if dist.is_initialized():  # every rank writes its own share to the same directory
        if dist.get_backend() != "gloo":
            need = need.cuda()
        dist.all_reduce(need)
    need_bytes = int(float(need) * 1.05)
    free = shutil.disk_usage(directory).free
    if need_bytes > free:
        for tmp in directory.glob("step_*.tmp"):  # this save's empty directory
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"not enough space for a checkpoint in {directory}: it needs about "
                              f"{need_bytes / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free; free space, lower "
                              "trainer.keep_checkpoints or point trainer.out_dir elsewhere; the previous checkpoint is intact")


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save and load that it assumes a single process; we asked for one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files, then their directories
        _fsync_file(path)
    _fsync_file(root)


def complete_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``directory``, newest first: renamed into place (not ``*.tmp``), with a
    readable progress record and DCP's metadata. ``latest`` is not trusted over the directory listing."""
    out = []
    for path in sorted(Path(directory).glob("step_*"), reverse=True):
        if path.suffix == ".tmp" or not (path / ".metadata").exists():
            continue
        try:
            int(json.loads((path / PROGRESS).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out.append(path)
    return out


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``directory`` (``complete_checkpoints``), or None."""
    complete = complete_checkpoints(directory)
    return complete[0] if complete else None


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Collective. Loads into the model's (and optimizer's) current layout; returns the saved progress."""
    path = Path(path)
    if not (path / PROGRESS).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {PROGRESS})")
    try:
        progress = json.loads((path / PROGRESS).read_text())
    except ValueError:
        raise ValueError(f"{path / PROGRESS} is damaged (not JSON)") from None
    state: dict[str, Any] = {"model": _saved_model_state(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    adapted = next(lora_modules(model), None) is not None  # then the frozen base is not in the checkpoint
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not adapted))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    rng_file = path / f"rng_rank{_rank():05d}.pt"
    if restore_rng and progress.get("world_size") == _world() and rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return progress


def load_rank_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """This rank's ``rank_state`` from a checkpoint, or None (none saved, or saved by another world size)."""
    path = Path(path)
    progress = json.loads((path / PROGRESS).read_text())
    file = path / f"state_rank{_rank():05d}.pt"
    if progress.get("world_size") != _world() or not file.exists():
        return None
    return torch.load(file, weights_only=False)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded model state on CPU, materialized on rank 0 only (empty elsewhere); from
    every pipeline stage of a ``PipelinedModel``."""
    if isinstance(model, PipelinedModel):  # it gathers its stages itself
        return model.full_state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_model(model: torch.nn.Module, empty: "Callable[[], torch.nn.Module]") -> torch.nn.Module | None:
    """Collective: an unsharded CPU copy of ``model`` on rank 0 (None elsewhere), loaded into ``empty()``
    (a module of the same structure built on the meta device); the model itself in one process."""
    if not dist.is_initialized():
        return model
    state = full_state_dict(model)
    plain = None
    if _rank() == 0:
        with torch.device("meta"):
            plain = empty()
        plain.load_state_dict(state, assign=True)
    _barrier()
    return plain


def export_hf(model: torch.nn.Module, path: str | os.PathLike, *, tokenizer: Any = None,
              lora: LoRAConfig | None = None, base: str | None = None) -> Path | None:
    """Collective: gather a sharded ``Transformer`` and write it from rank 0 as a Hugging Face checkpoint,
    LoRA adapters merged; with ``lora.export_peft`` the adapters also go to ``<path>/../peft`` in PEFT's
    format, over the base checkpoint ``base``."""
    state = full_state_dict(model)
    out = None
    if _rank() == 0:
        if lora is not None and lora.rank:
            if lora.export_peft:
                save_peft_adapters(state, lora, Path(path).parent / "peft", base_model=base)
            state = merge_lora_state(state, lora.alpha / lora.rank)
        with torch.device("meta"):
            plain = Transformer(model.config)
        plain.load_state_dict(state, assign=True)
        out = save_hf_model(plain, path, tokenizer=tokenizer)
    _barrier()
    return out
