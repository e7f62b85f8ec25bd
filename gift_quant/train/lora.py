"""Recovery baselines on the same frozen quantized model: LoRA (PEFT) on every MixedLinear.

The rank is matched to GIFT-SW's trainable parameter count unless given:
``r = round(sum_l k_l N_l / sum_l (K_l + N_l))`` (a LoRA of rank r on an N x K layer trains
r (K + N) parameters; the salient columns train k N). Needs the [baselines] extra (peft).
"""

from __future__ import annotations

from torch import nn

from gift_quant.mixed_linear import MixedLinear

__all__ = ["attach_lora", "load_lora", "matched_lora_rank"]


def matched_lora_rank(model: nn.Module) -> int:
    layers = [m for m in model.modules() if isinstance(m, MixedLinear)]
    salient = sum(m.num_salient * m.out_features for m in layers)
    per_rank = sum(m.in_features + m.out_features for m in layers)
    return max(1, round(salient / per_rank))


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError(
            "train.method=lora needs the [baselines] extra: pip install peft"
        ) from exc
    return peft


_LORA_CLASS = None


def _mixed_lora_class():
    """PEFT's LoRA Linear around a MixedLinear base (the base is called as is)."""
    global _LORA_CLASS
    if _LORA_CLASS is None:
        from peft.tuners.lora.layer import Linear as LoraLinear

        class MixedLoraLinear(LoraLinear):
            def _get_in_out_features(self, module):
                return module.in_features, module.out_features

        _LORA_CLASS = MixedLoraLinear
    return _LORA_CLASS


def attach_lora(model: nn.Module, rank: int = 0, alpha: float = 0.0, seed: int = 0):
    """Wrap ``model`` with a PEFT LoRA adapter on every MixedLinear; everything else frozen.

    Returns ``(peft_model, rank)``. alpha defaults to the rank (scaling 1).
    """
    import torch

    peft = _peft()
    rank = rank or matched_lora_rank(model)
    targets = sorted(n for n, m in model.named_modules() if isinstance(m, MixedLinear))
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        lora_dropout=0.0,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    config._register_custom_module({MixedLinear: _mixed_lora_class()})
    torch.manual_seed(seed)  # lora_A's init
    return peft.get_peft_model(model, config), rank


def load_lora(model: nn.Module, adapter_dir):
    """A saved LoRA baseline adapter on top of its quantized model."""
    peft = _peft()
    config = peft.LoraConfig.from_pretrained(adapter_dir)
    config._register_custom_module({MixedLinear: _mixed_lora_class()})
    return peft.PeftModel.from_pretrained(model, adapter_dir, config=config)
