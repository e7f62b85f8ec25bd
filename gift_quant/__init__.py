"""gift_quant: post-training quantization recovery for LLMs.

GPTQ/RTN with FP16 salient columns, GIFT-SW fine-tuning of those columns, mixed-precision
safetensors export, and a torch/Triton dequant-matmul.

Importing the package is cheap: it imports neither torch nor transformers. The public names
below load their modules on first use, and the ``gift_quant`` quantizer is registered with
transformers the moment transformers builds its quantizer registry (or at once, when it already
has), so ``AutoModelForCausalLM.from_pretrained(export_dir)`` after ``import gift_quant`` loads
an export without ``import gift_quant`` paying for transformers' quantizers (and torchao).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

from gift_quant.version import __version__

_LAZY = {
    "Backend": "gift_quant.kernels",
    "MixedLinear": "gift_quant.mixed_linear",
    "Recipe": "gift_quant.recipe",
    "dequant_matmul": "gift_quant.kernels",
    "fuse_siblings": "gift_quant.fused",
    "inspect_checkpoint": "gift_quant.io.checkpoint",
    "load_quantized": "gift_quant.io.load",
    "load_recipe": "gift_quant.recipe",
    "quantize_model": "gift_quant.quantize",
    "save_quantized": "gift_quant.io.export",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gift_quant' has no attribute {name!r}")


_HF_REGISTRY = "transformers.quantizers.auto"


def _register_hf_quantizer() -> None:
    try:  # registers the transformers quantizer (transformers >= 5.20)
        from gift_quant.io import transformers_hook  # noqa: F401
    except ImportError as exc:  # an older transformers: everything but from_pretrained works
        logging.getLogger(__name__).warning("transformers quantizer hook unavailable: %s", exc)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when transformers' quantizer registry is imported, it lets the
    other finders locate it and registers our quantizer right after the module has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HF_REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            sys.modules[fullname] = module  # the hook imports names from it
            _register_hf_quantizer()

        spec.loader.exec_module = exec_module
        return spec


if _HF_REGISTRY in sys.modules:
    _register_hf_quantizer()
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
