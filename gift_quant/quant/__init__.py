"""Quantizers (RTN, GPTQ) over the non-salient columns, and their typed result.

``QUANTIZERS`` names the built-in quantizers (gptq.py, rtn.py) and imports them on first use.
"""

from gift_quant.quant.base import QUANTIZERS, QuantizedWeight, Quantizer, check_shape, group_index
from gift_quant.quant.grid import Grid

__all__ = ["QUANTIZERS", "Grid", "QuantizedWeight", "Quantizer", "check_shape", "group_index"]
