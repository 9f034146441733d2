"""JSONL reading with errors that name the file and line of a malformed row."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")


class DataError(ValueError):
    """A data row is malformed; the message starts with ``file:line``."""


def read_jsonl(path: str | os.PathLike, parse: Callable[[Any], T]) -> Iterator[T]:
    """Yield ``parse(row)`` for each non-blank line; ``parse`` raises ValueError/KeyError/TypeError on a bad row."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            try:
                yield parse(row)
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{lineno}: {exc}") from None
