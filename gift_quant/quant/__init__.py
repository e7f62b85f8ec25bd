"""Quantizers (RTN, GPTQ) over the non-salient columns, and their typed result.

Importing this package registers the built-in quantizers in ``QUANTIZERS``.
"""

from gift_quant.quant import gptq as _gptq  # noqa: F401  (registers "gptq")
from gift_quant.quant import rtn as _rtn  # noqa: F401  (registers "rtn")
from gift_quant.quant.base import QUANTIZERS, QuantizedWeight, Quantizer, check_shape, group_index
from gift_quant.quant.grid import Grid

__all__ = ["QUANTIZERS", "Grid", "QuantizedWeight", "Quantizer", "check_shape", "group_index"]
