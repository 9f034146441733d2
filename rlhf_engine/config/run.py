"""A whole run's config, and how it is read: YAML recipes, dotted overrides, validation with key paths."""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from .algorithm import (
    AILabelerConfig,
    AlgorithmConfig,
    ConstitutionalConfig,
    IterateConfig,
    PipelineConfig,
    RewardConfig,
)
from .model import ModelConfig, section
from .training import (
    DataConfig,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    RolloutConfig,
    TrainerConfig,
)


@section
class RunConfig:
    """A whole run: one section per concern."""

    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    trainer: TrainerConfig
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    iterate: IterateConfig = dataclasses.field(default_factory=IterateConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    cai: ConstitutionalConfig = dataclasses.field(default_factory=ConstitutionalConfig)
    rlaif: AILabelerConfig = dataclasses.field(default_factory=AILabelerConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------------------------
# Loading, overrides, validation


class ConfigError(ValueError):
    """A recipe or an override does not fit the schema; the message names every bad key path."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-5"`` -> (["optim", "lr"], 1e-05). Values are parsed as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" (no dot) as a string; accept it as the number it means
            value = float(value) if any(c in value for c in "eE") and value[0] in "+-.0123456789" else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge dotted overrides into a nested dict (in place); intermediate sections are created."""
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: '{'.'.join(path[: i + 1])}' is a value, not a section"
                )
            node = child
        node[path[-1]] = value
    return tree


def _schema_at(path: tuple[str | int, ...]) -> type | None:
    """The dataclass that owns the last key of ``path``, for suggesting a valid key."""
    cls: Any = RunConfig
    for part in path[:-1]:
        if not dataclasses.is_dataclass(cls) or not isinstance(part, str):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        hint = hints[part]
        cls = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
    return cls if dataclasses.is_dataclass(cls) else None


def _describe(err: dict[str, Any], source: str) -> str:
    path = tuple(err["loc"])
    key = ".".join(str(p) for p in path) or "<root>"
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        owner = _schema_at(path)
        valid = [f.name for f in dataclasses.fields(owner)] if owner else []
        close = difflib.get_close_matches(str(path[-1]), valid, n=1)
        parent = ".".join(str(p) for p in path[:-1])
        hint = f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
        return f"{source}: unknown key '{key}'{hint} (valid here: {', '.join(valid)})"
    if err["type"] == "missing" or err["type"] == "missing_argument":
        return f"{source}: missing required key '{key}'"
    got = err.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
    return f"{source}: invalid value at '{key}': {err['msg']}{got_text}"


def validate(tree: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a nested dict against ``RunConfig``; raises ``ConfigError`` listing every problem."""
    try:
        return TypeAdapter(RunConfig).validate_python(tree)
    except ValidationError as exc:
        lines = [_describe(e, source) for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_config(recipe: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or start empty), merge dotted overrides, validate."""
    tree: dict[str, Any] = {}
    source = "overrides"
    if recipe is not None:
        path = Path(recipe)
        if not path.exists():
            raise ConfigError(f"recipe {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        source = str(path)
    apply_overrides(tree, list(overrides or []))
    return validate(tree, source)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain JSON-compatible nested dict (tuples become lists)."""
    return TypeAdapter(RunConfig).dump_python(cfg, mode="json")


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
