"""The package's name -> function registries: the quantizers and the GIFT-SW noise kinds.

The recipe's choices for ``quant.method`` and ``train.noise`` are read from ``QUANTIZERS`` and
``NOISES``, so a new entry needs no second list. An entry names where its function lives
(``"module:attribute"``) and is imported on the first ``get``: the recipe can list and check
the names without importing torch, so ``--help`` and recipe errors stay quick.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["NOISES", "QUANTIZERS", "Registry", "UnknownName"]

T = TypeVar("T")


class UnknownName(ValueError):
    """A name that no entry of the registry answers to; the message lists the known ones."""


class Registry(Generic[T]):
    """Mapping from a lowercase name to a function, given as ``"module:attribute"``."""

    def __init__(self, kind: str, entries: dict[str, str]) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = dict(entries)

    def get(self, name: str) -> T:
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownName(
                f"unknown {self.kind} {name!r}{hint} (known: {sorted(self._entries)})"
            )
        entry = self._entries[name]
        if isinstance(entry, str):
            module, attribute = entry.split(":")
            entry = getattr(importlib.import_module(module), attribute)
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


# (weight [N, K], hessian [K, K] or None, salient_idx [k], cfg: QuantConfig) -> QuantizedWeight
QUANTIZERS: Registry[Callable] = Registry(
    "quantizer", {"gptq": "gift_quant.quant.gptq:gptq", "rtn": "gift_quant.quant.rtn:rtn"}
)
# (shape, generator, device, dtype) -> unit-step noise; sample_noise scales row i by delta_i.
NOISES: Registry[Callable] = Registry(
    "noise", {"normal": "gift_quant.noise:normal", "uniform": "gift_quant.noise:uniform"}
)
