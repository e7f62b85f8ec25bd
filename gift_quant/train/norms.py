"""Normalization weights as trainable parameters beside the salient columns (``train.norms``).

The comparison the GIFT-SW paper draws with full fine-tuning of the salient columns plus the
norms. Which modules are norms is structural: every module whose class name ends in "Norm"
and that holds a 1-D ``weight`` (LlamaRMSNorm, Qwen's q/k norms, nn.LayerNorm, ...). They train
in fp32 (AdamW on fp16 weights of size one would lose most updates): the weight is held in
fp32 for the run, the norm computes in fp32 and hands its output back in the dtype it was given,
and :meth:`TrainedNorms.finish` casts the trained weights back to their own dtype for export.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TrainedNorms", "norm_modules"]


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every normalization module of ``model`` by name (see the module docstring)."""
    return {
        name: m
        for name, m in model.named_modules()
        if type(m).__name__.endswith("Norm")
        and isinstance(getattr(m, "weight", None), nn.Parameter)
        and m.weight.dim() == 1
    }


def _to_fp32(module: nn.Module, args: tuple):
    x = args[0]
    module._gq_dtype = x.dtype
    return (x.float(), *args[1:])


def _back(module: nn.Module, args: tuple, out):
    return out.to(module._gq_dtype) if torch.is_tensor(out) else out


class TrainedNorms:
    """Make the norms of ``model`` trainable in fp32; :meth:`finish` undoes all but the
    trained values."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = norm_modules(model)
        if not self.modules:
            raise ValueError("train.norms: the model has no normalization module to train")
        self.params: list[tuple[nn.Parameter, torch.dtype]] = []
        self.hooks = []
        for m in self.modules.values():
            for p in (m.weight, getattr(m, "bias", None)):
                if isinstance(p, nn.Parameter):
                    self.params.append((p, p.dtype))
                    p.data = p.data.float()
                    p.requires_grad_(True)
            self.hooks.append(m.register_forward_pre_hook(_to_fp32))
            self.hooks.append(m.register_forward_hook(_back))

    def finish(self) -> None:
        """Hooks off, weights frozen again in their own dtype (trained values kept)."""
        for h in self.hooks:
            h.remove()
        for p, dtype in self.params:
            p.requires_grad_(False)
            p.data = p.data.to(dtype)
        for m in self.modules.values():
            m.__dict__.pop("_gq_dtype", None)
