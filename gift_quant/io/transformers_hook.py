"""transformers integration: ``AutoModelForCausalLM.from_pretrained(export_dir)`` after
``import gift_quant``, so ``generate()``, pipelines and lm-eval's HF wrapper work unchanged.

Before any weight loads, the files are checked against the export's ``manifest.json``
digests (a changed or deleted tensor is an error naming it). The quantizer swaps each target
Linear of the skeleton for a MixedLinear before weights load; transformers loads the GPTQ
tensors from model.safetensors; afterwards the quantizer converts GPTQ v1 zero-points and
loads the salient columns from their own file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from gift_quant.io.export import FORMAT, FORMAT_VERSION, QUANT_METHOD, SALIENT_FILE, zeros_from_file
from gift_quant.mixed_linear import MixedLinear
from gift_quant.modeling import set_module

__all__ = ["GiftQuantConfig", "GiftQuantHfQuantizer"]


@register_quantization_config(QUANT_METHOD)
class GiftQuantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` block of a gift_quant export (see gift_quant.io.export)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format = kwargs.pop("format", FORMAT)
        self.format_version = kwargs.pop("format_version", FORMAT_VERSION)
        self.checkpoint_format = kwargs.pop("checkpoint_format", "gptq")
        self.salient_file = kwargs.pop("salient_file", SALIENT_FILE)
        self.modules = kwargs.pop("modules", {})
        for key, value in kwargs.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@register_quantizer(QUANT_METHOD)
class GiftQuantHfQuantizer(HfQuantizer):
    """Loads pre-quantized gift_quant exports; quantizing on the fly is what ``quantize`` does."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs) -> None:
        cfg = self.quantization_config
        if cfg.format != FORMAT or not isinstance(cfg.format_version, int):
            raise ValueError(f"quantization_config format {cfg.format!r} is not {FORMAT!r}")
        if cfg.format_version > FORMAT_VERSION:
            raise ValueError(
                f"gift_quant format_version {cfg.format_version} is newer than this gift_quant "
                f"reads ({FORMAT_VERSION}); upgrade gift_quant"
            )
        if not cfg.modules:
            raise ValueError("quantization_config lists no quantized modules")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise ValueError("gift_quant checkpoints load from local safetensors files only")
        self._root = Path(checkpoint_files[0]).parent
        from gift_quant.io.checkpoint import verify_manifest

        verify_manifest(self._root)  # the SHA-256 digests written at export, as load_quantized
        salient_path = self._root / self.quantization_config.salient_file
        if not salient_path.is_file():
            raise FileNotFoundError(
                f"{salient_path} is missing: it holds the FP16 salient columns of this checkpoint"
            )
        dtype = kwargs.get("dtype")
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float16
        for name, spec in self.quantization_config.modules.items():
            set_module(model, name, MixedLinear.empty(spec, dtype=dtype))
        # salient tensors live in their own file and are loaded after the main weights
        ignore = set(model._keys_to_ignore_on_load_missing or ())
        model._keys_to_ignore_on_load_missing = list(ignore | {r"\.salient_(idx|weight)$"})
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        salient = load_file(self._root / cfg.salient_file)
        for name, spec in cfg.modules.items():
            layer = model.get_submodule(name)
            device = layer.qweight.device
            layer.qzeros = zeros_from_file(layer.qzeros, spec["bits"], cfg.checkpoint_format)
            for field in ("salient_idx", "salient_weight"):
                key = f"{name}.{field}"
                if key not in salient:
                    raise KeyError(f"{self._root / cfg.salient_file}: tensor {key!r} is missing")
                setattr(layer, field, salient[key].to(device))
            layer.scales = layer.scales.to(torch.float16)  # the loader may cast float buffers
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return False  # export with gift_quant.save_quantized, which keeps the salient file apart

    @property
    def is_trainable(self) -> bool:
        return False
