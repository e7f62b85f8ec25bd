"""gift_quant: post-training quantization recovery for LLMs.

GPTQ/RTN with FP16 salient columns, GIFT-SW fine-tuning of those columns, mixed-precision
safetensors export, and a torch/Triton dequant-matmul.

Importing the package registers the ``gift_quant`` quantizer with transformers, so
``AutoModelForCausalLM.from_pretrained(export_dir)`` loads an export.
"""

__version__ = "0.1.0"

try:  # registers the transformers quantizer (transformers >= 5.20)
    from gift_quant.io import transformers_hook as _hf  # noqa: E402,F401
except ImportError as _exc:  # an older transformers: everything but from_pretrained(export) works
    import logging as _logging

    _logging.getLogger(__name__).warning("transformers quantizer hook unavailable: %s", _exc)
from gift_quant.io.export import save_quantized  # noqa: E402
from gift_quant.io.load import inspect_checkpoint, load_quantized  # noqa: E402
from gift_quant.kernels import Backend, dequant_matmul  # noqa: E402
from gift_quant.mixed_linear import MixedLinear  # noqa: E402
from gift_quant.quantize import quantize_model  # noqa: E402
from gift_quant.recipe import Recipe, load_recipe  # noqa: E402

__all__ = [
    "Backend",
    "MixedLinear",
    "Recipe",
    "__version__",
    "dequant_matmul",
    "inspect_checkpoint",
    "load_quantized",
    "load_recipe",
    "quantize_model",
    "save_quantized",
]
