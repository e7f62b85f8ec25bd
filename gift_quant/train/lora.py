"""Recovery baselines on the same frozen quantized model: LoRA and DoRA (PEFT) on every
MixedLinear.

The rank is matched to GIFT-SW's trainable parameter count unless given. On an N x K layer the
salient columns train k N parameters, a LoRA of rank r trains r (K + N), and a DoRA of rank r
trains r (K + N) + N (its magnitude vector), so

    LoRA: r = round(sum_l k_l N_l / sum_l (K_l + N_l))
    DoRA: r = round((sum_l k_l N_l - sum_l N_l) / sum_l (K_l + N_l))

Needs the [baselines] extra (peft).
"""

from __future__ import annotations

from types import SimpleNamespace

from torch import nn

from gift_quant.mixed_linear import MixedLinear

__all__ = ["adapter_params", "attach_lora", "load_lora", "matched_lora_rank", "matched_rank"]


def matched_lora_rank(model: nn.Module, dora: bool = False) -> int:
    """The adapter rank whose trainable parameters come closest to the salient columns'."""
    layers = [m for m in model.modules() if isinstance(m, MixedLinear)]
    return matched_rank([(m.num_salient, m.out_features, m.in_features) for m in layers], dora)


def matched_rank(layers: list[tuple[int, int, int]], dora: bool = False) -> int:
    """:func:`matched_lora_rank` of layers given as (salient columns k, N, K)."""
    salient = sum(k * n for k, n, _ in layers)
    magnitudes = sum(n for _, n, _ in layers) if dora else 0
    per_rank = sum(n + k_in for _, n, k_in in layers)
    return max(1, round((salient - magnitudes) / per_rank))


def adapter_params(layers: list[tuple[int, int, int]], rank: int, dora: bool = False) -> int:
    """Trainable parameters of a rank-``rank`` adapter on layers given as (k, N, K)."""
    return sum(rank * (n + k_in) + (n if dora else 0) for _, n, k_in in layers)


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError(
            "train.method=lora and train.method=dora need the [baselines] extra: pip install peft"
        ) from exc
    return peft


_LORA_CLASS = None


def _dense_view(layer: MixedLinear, dtype):
    """What PEFT's DoRA reads from its base layer: the dense weight (for the row norms of
    W + scale * B A), the bias, and parameters() (for DeepSpeed's gather, a no-op here)."""
    return SimpleNamespace(
        weight=_dense_weight(layer, dtype), bias=layer.bias, parameters=layer.parameters
    )


def _dense_weight(layer: MixedLinear, dtype):
    """``layer.dequantize(dtype)``, kept on the layer while its tensors are unchanged: the base
    is frozen, and rebuilding it at every DoRA forward (a dozen unpacking ops per layer) made
    a DoRA step several times a LoRA step. Costs one dense copy of the base weights, as a
    DoRA on an unquantized model holds."""
    from gift_quant.kernels.cpu import cached_form

    return cached_form(layer, "dora-dense", dtype, lambda: layer.dequantize(dtype))


def _mixed_lora_class():
    """PEFT's LoRA Linear around a MixedLinear base (the base is called as is). With
    ``use_dora`` its DoRA magnitude takes the dense weight from ``MixedLinear.dequantize``:
    PEFT's own DoRA reads ``base_layer.weight``, which a packed layer does not have."""
    global _LORA_CLASS
    if _LORA_CLASS is None:
        import torch
        from peft.tuners.lora.dora import DoraLinearLayer
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.variants import DoraLinearVariant

        class MixedDoraLayer(DoraLinearLayer):
            def update_layer(self, *, base_layer, **kwargs) -> None:
                super().update_layer(base_layer=_dense_view(base_layer, torch.float32), **kwargs)

            def forward(self, x, *, base_layer, **kwargs):
                return super().forward(x, base_layer=_dense_view(base_layer, x.dtype), **kwargs)

        class MixedDoraVariant(DoraLinearVariant):
            @staticmethod
            def init(module, adapter_name: str, **kwargs) -> None:
                if not module.lora_magnitude_vector:  # first DoRA adapter: make it trainable
                    module.adapter_layer_names = (
                        *module.adapter_layer_names,
                        "lora_magnitude_vector",
                    )
                layer = MixedDoraLayer(fan_in_fan_out=False)
                layer.update_layer(
                    base_layer=module.get_base_layer(),
                    lora_A=module.lora_A[adapter_name].weight,
                    lora_B=module.lora_B[adapter_name].weight,
                    scaling=module.scaling[adapter_name],
                )
                module.lora_magnitude_vector[adapter_name] = layer

        class MixedLoraLinear(LoraLinear):
            def _get_in_out_features(self, module):
                return module.in_features, module.out_features

            @property
            def lora_variants(self):
                return {**super().lora_variants, ("use_dora",): MixedDoraVariant}

        _LORA_CLASS = MixedLoraLinear
    return _LORA_CLASS


def attach_lora(
    model: nn.Module, rank: int = 0, alpha: float = 0.0, seed: int = 0, dora: bool = False
):
    """Wrap ``model`` with a PEFT LoRA (or, with ``dora``, DoRA) adapter on every MixedLinear;
    everything else frozen.

    Returns ``(peft_model, rank)``; rank 0 = matched to the salient columns' parameter count.
    alpha defaults to the rank (scaling 1).
    """
    import torch

    peft = _peft()
    rank = rank or matched_lora_rank(model, dora)
    targets = sorted(n for n, m in model.named_modules() if isinstance(m, MixedLinear))
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        lora_dropout=0.0,
        target_modules=targets,
        bias="none",
        use_dora=dora,
        task_type="CAUSAL_LM",
    )
    config._register_custom_module({MixedLinear: _mixed_lora_class()})
    torch.manual_seed(seed)  # lora_A's init
    return peft.get_peft_model(model, config), rank


def load_lora(model: nn.Module, adapter_dir):
    """A saved LoRA or DoRA baseline adapter on top of its quantized model."""
    peft = _peft()
    config = peft.LoraConfig.from_pretrained(adapter_dir)
    config._register_custom_module({MixedLinear: _mixed_lora_class()})
    return peft.PeftModel.from_pretrained(model, adapter_dir, config=config)
