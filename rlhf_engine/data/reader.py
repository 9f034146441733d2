"""Reading data rows from JSONL or Parquet files, with errors that name the file and row of a bad one.

    rows = list(read_rows("train.jsonl", parse_conversation))   # or "train.parquet"

``parse`` validates one row (a dict) and raises ValueError/KeyError/TypeError saying what is wrong;
the error is re-raised as ``DataError("train.jsonl:17: ...")`` (Parquet: ``train.parquet:row 17``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")


class DataError(ValueError):
    """A data row is malformed; the message starts with ``file:line``."""


def read_jsonl(path: str | os.PathLike, parse: Callable[[Any], T]) -> Iterator[T]:
    """Yield ``parse(row)`` for each non-blank line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    with path.open(encoding="utf-8-sig", newline="\n") as f:  # a leading byte-order mark is dropped
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: {json_error(line, exc)}") from None
            yield _parse(parse, row, f"{path}:{lineno}")


def json_error(line: str, exc: json.JSONDecodeError) -> str:
    """Where and why ``line`` is not JSON, in one line: the 1-based character column of the offending
    character, and the text around it with that character marked. A comma before a closing bracket
    is reported at the comma (Python's decoder points at the bracket after it)."""
    pos, msg = exc.pos, exc.msg
    before = line[:pos].rstrip()
    if pos < len(line) and line[pos] in "}]" and before.endswith(","):
        pos, msg = len(before) - 1, f"trailing comma before '{line[exc.pos]}'"
    text = line.rstrip("\r\n")
    lo, hi = max(0, pos - 30), min(len(text), pos + 30)
    excerpt = f"{'...' if lo else ''}{text[lo:pos]}>>{text[pos:pos + 1]}<<{text[pos + 1:hi]}{'...' if hi < len(text) else ''}"
    return f"not valid JSON at column {pos + 1}: {msg}: {excerpt}"


def read_parquet(path: str | os.PathLike, parse: Callable[[Any], T]) -> Iterator[T]:
    """Yield ``parse(row)`` for each row of a Parquet file (nested columns become lists and dicts)."""
    try:
        import pyarrow.parquet as pq  # optional: the [data] extra
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install 'rlhf-engine[data]')") from None
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    rowno = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for row in batch.to_pylist():
            rowno += 1
            yield _parse(parse, row, f"{path}:row {rowno}")


def read_rows(path: str | os.PathLike, parse: Callable[[Any], T]) -> list[T]:
    """All rows of a ``.jsonl``/``.json`` (one object per line) or ``.parquet`` file, parsed; at least one."""
    path = Path(path)
    reader = read_parquet if path.suffix == ".parquet" else read_jsonl
    rows = list(reader(path, parse))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _parse(parse: Callable[[Any], T], row: Any, where: str) -> T:
    try:
        return parse(row)
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{where}: {exc}") from None
