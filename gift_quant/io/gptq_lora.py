"""Engine view of an export: a plain GPTQ checkpoint + a PEFT LoRA adapter for the salient columns.

No serving engine expresses per-column FP16 inside a GPTQ layer, but every engine with LoRA on
GPTQ bases can run::

    W_mixed = dequant(Q) + B @ A,  A = one-hot rows selecting the salient inputs [r, K],
                                   B = the FP16 salient columns [N, r],  lora_alpha = r

because the salient columns' codes sit at the zero-point (dequant(Q)[:, S] = 0). Layers with
fewer than ``r`` salient columns are padded with zero rows/columns (gptqmodel's adapter loader
needs one rank everywhere). Output layout::

    OUT/            GPTQ checkpoint: config.json (quant_method gptq), quantize_config.json,
                    model.safetensors, tokenizer files
    OUT/salient_lora/   adapter_config.json, adapter_model.safetensors
    OUT/manifest.json   SHA-256 of every file and tensor (verified by gift_quant's loader)

``gift_quant.load_quantized`` (and so ``eval``, ``inspect``, ``export``) reads this directory
back as the mixed model: the one-hot adapter is folded back into salient columns.

Load with transformers + optimum + gptqmodel + peft::

    model = AutoModelForCausalLM.from_pretrained(OUT)
    model = PeftModel.from_pretrained(model, OUT / "salient_lora")

Serve with vLLM (not runnable here; vLLM supports LoRA on GPTQ bases)::

    vllm serve OUT --enable-lora --max-lora-rank R --lora-modules salient=OUT/salient_lora

where R is the smallest of 8, 16, 32, 64, 128, 256, 320, 512 that is >= the adapter's r.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from gift_quant.io.export import (
    atomic_directory,
    checkpoint_tensors,
    gptq_block,
    quantized_layers,
    resolve_checkpoint_format,
    write_manifest,
    write_model_files,
)

__all__ = ["ADAPTER_DIR", "VLLM_LORA_RANKS", "save_gptq_lora"]

ADAPTER_DIR = "salient_lora"
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def lora_tensors(model: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """PEFT-named lora_A (one-hot selectors), lora_B (FP16 salient columns), padded to ``rank``."""
    tensors = {}
    for name, layer in quantized_layers(model).items():
        k, K, N = layer.num_salient, layer.in_features, layer.out_features
        A = torch.zeros(rank, K, dtype=torch.float16)
        A[torch.arange(k), layer.salient_idx.long().cpu()] = 1.0
        B = torch.zeros(N, rank, dtype=torch.float16)
        B[:, :k] = layer.salient_weight.cpu()
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    return tensors


def save_gptq_lora(
    model: nn.Module, out_dir: str | Path, *, tokenizer=None, checkpoint_format: str = "auto"
) -> Path:
    """Write the engine view of a model with MixedLinear layers (see module docstring)."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no quantized (MixedLinear) layers to export")
    fmt = resolve_checkpoint_format(checkpoint_format, layers)
    main, _ = checkpoint_tensors(model, fmt)
    rank = max(1, max(layer.num_salient for layer in layers.values()))
    gptq = gptq_block(layers, fmt)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,  # scaling alpha / r = 1: B @ A is added as is
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(layers),
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    with atomic_directory(out_dir) as tmp:
        write_model_files(tmp, model, main, gptq, tokenizer, 5 * 2**30)
        (tmp / "quantize_config.json").write_text(json.dumps(gptq, indent=2) + "\n")
        adapter = tmp / ADAPTER_DIR
        adapter.mkdir()
        save_file(
            lora_tensors(model, rank),
            adapter / "adapter_model.safetensors",
            metadata={"format": "pt"},
        )
        (adapter / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        write_manifest(tmp)
    return Path(out_dir)
