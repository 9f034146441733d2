"""Registries keyed by name: algorithms (``catalog``), DPO losses, reward functions.

    DPO_LOSSES = Registry("DPO loss")

    @DPO_LOSSES.register("ipo")
    def ipo(...): ...

    DPO_LOSSES["ipo"]          # unknown names fail listing the registered ones

The bottom layer of the package: it imports nothing (see docs/architecture.md, "Layers").
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

F = TypeVar("F")  # an entry: a function, or a record such as catalog.RLAlgorithm


class Registry(Generic[F]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            return fn

        return add

    def __getitem__(self, name: str) -> F:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._items))}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        """Names in registration order (the first built-in is the default where one is needed)."""
        return iter(list(self._items))

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register a toy entry clean up with this)."""
        self._items.pop(name, None)
