"""A tiny name -> object registry; entries are added at import of our own modules.

The quantizers (``gift_quant.quant.QUANTIZERS``) and the GIFT-SW noise kinds
(``gift_quant.noise.NOISES``) live in registries, and the recipe's choices for
``quant.method`` and ``train.noise`` are read from them, so a new entry needs no second list.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name that no entry of the registry answers to; the message lists the known ones."""


class Registry(Generic[T]):
    """Append-only mapping from a lowercase name to a function or class."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownName(
                f"unknown {self.kind} {name!r}{hint} (known: {sorted(self._entries)})"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
