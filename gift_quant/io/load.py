"""Read mixed-precision exports (and plain GPTQ checkpoints) back into MixedLinear models.

Everything is validated from the files' headers before the model is built
(``io.checkpoint``: a missing or truncated file, a missing salient tensor, a wrong shape or
dtype, an unknown format version -- each a :class:`CheckpointError` naming the file and the
tensor). Then the bytes: an export with a ``manifest.json`` is checked against its SHA-256
digests (``verify=False`` skips this), every tensor the model expects must be in the files, and
no weight may hold NaN or inf. Only JSON and safetensors are read; nothing is unpickled.

"A model directory" means any of: an export (``quantize``, ``recover``'s ``model/``), a
``recover`` output directory (its final model), or a ``gptq+lora`` export, whose one-hot
adapter is folded back into the salient columns it encodes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from gift_quant.io.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    inspect_checkpoint,
    read_headers,
    stored_dtype,
    verify_manifest,
)
from gift_quant.io.export import zeros_from_file
from gift_quant.io.gptq_lora import ADAPTER_DIR
from gift_quant.kernels import Backend
from gift_quant.mixed_linear import MixedLinear
from gift_quant.modeling import cast_params, set_module

__all__ = ["load_quantized"]


def _fold_adapter(info: CheckpointInfo, state: dict) -> None:
    """Turn the one-hot LoRA of a gptq+lora export back into salient columns (exact: A's rows
    select input columns, B holds their FP16 weights, scaling alpha / r)."""
    adapter = info.path / ADAPTER_DIR
    file = adapter / "adapter_model.safetensors"
    read_headers(file)
    tensors = load_file(file)
    scale = float(info.adapter["lora_alpha"]) / float(info.adapter["r"])
    for name, spec in info.modules.items():
        a_key = f"base_model.model.{name}.lora_A.weight"
        b_key = f"base_model.model.{name}.lora_B.weight"
        if a_key not in tensors or b_key not in tensors:
            raise CheckpointError(f"{file}: tensor {a_key!r} or {b_key!r} is missing")
        A, B = tensors[a_key].float(), tensors[b_key].float() * scale
        rows = torch.nonzero(A.abs().sum(1)).flatten()
        idx = A[rows].argmax(1)
        if not torch.equal(A[rows], torch.nn.functional.one_hot(idx, A.shape[1]).float()):
            raise CheckpointError(
                f"{file}: {a_key!r} is not a one-hot column selector, so it is a general LoRA; "
                f"apply it with PEFT (PeftModel.from_pretrained) instead"
            )
        order = torch.argsort(idx)
        state[f"{name}.salient_idx"] = idx[order].to(torch.int32)
        state[f"{name}.salient_weight"] = B[:, rows[order]].to(torch.float16)
        spec["num_salient"] = len(rows)


def _check_state(info: CheckpointInfo, model: nn.Module, state: dict) -> None:
    """Every tensor the model expects is present with its shape, and every float is finite."""
    expected = model.state_dict(keep_vars=True)
    where = {k: info.path / f for k, (f, _, _) in info.tensors.items()}
    for key, t in expected.items():
        if key not in state:
            if _is_tied(model, key):
                continue
            raise CheckpointError(
                f"{info.path}: tensor {key!r} is missing from {', '.join(info.files)}; "
                f"the export is incomplete, re-export it"
            )
        if list(state[key].shape) != list(t.shape):
            raise CheckpointError(
                f"{where.get(key, info.path)}: tensor {key!r} has shape {list(state[key].shape)}, "
                f"the model expects {list(t.shape)}; the file's header does not match the config"
            )
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"{where.get(key, info.path)}: tensor {key!r} holds NaN or inf values; "
                f"the export is corrupt, re-export it"
            )


def _is_tied(model: nn.Module, key: str) -> bool:
    """Whether ``key`` is an output embedding that transformers ties to the input one."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out = model.get_output_embeddings()
    return out is not None and key == f"{_module_name(model, out)}.weight"


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def load_quantized(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    backend: Backend | str = Backend.AUTO,
    trust_remote_code: bool = False,
    verify: bool = True,
) -> nn.Module:
    """Build the model of a model directory with MixedLinear layers (eval mode).

    ``path``: an export, a recover output directory or a gptq+lora export (module docstring).
    ``dtype`` is the dtype of the unquantized tensors (default: as stored); scales and salient
    columns stay fp16, codes stay int32. ``verify`` checks the files' SHA-256 digests (off
    saves one read of every file). On the CPU with ``backend`` auto or cpu, the output Linear
    becomes a :class:`gift_quant.kernels.cpu.CpuHead` (the same tensors; in inference it reads
    an exact fp16 copy of its weight).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    backend = Backend(backend)  # an unknown name fails here, before any file is read
    info = inspect_checkpoint(path)
    root = info.path
    if verify:
        verify_manifest(root)
    cfg_dict = dict(info.config)
    qcfg = cfg_dict.pop("quantization_config")
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise CheckpointError(f"{root / 'config.json'}: no model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    stored = stored_dtype(info)
    state = {}
    for file in info.files:
        state.update(load_file(root / file))
    if info.salient_file:
        state.update(load_file(root / info.salient_file))
    modules = {name: dict(spec) for name, spec in info.modules.items()}
    for name, spec in modules.items():
        key = f"{name}.qzeros"
        state[key] = zeros_from_file(state[key], spec["bits"], info.checkpoint_format)
        if info.kind == "gptq":  # a plain GPTQ layer is a mixed layer without salient columns
            state[f"{name}.salient_idx"] = torch.zeros(0, dtype=torch.int32)
            state[f"{name}.salient_weight"] = torch.zeros(
                spec["out_features"], 0, dtype=torch.float16
            )
    if info.adapter is not None:
        info.modules = modules
        _fold_adapter(info, state)
    with no_init_weights():  # parameters are allocated but not initialised: all get assigned
        model = AutoModelForCausalLM.from_config(
            config, dtype=stored, trust_remote_code=trust_remote_code
        )
    for name, spec in modules.items():
        try:
            model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(
                f"{root}: module {name!r} does not exist in {model_type}"
            ) from exc
        layer = MixedLinear.empty(spec, dtype=stored, device="meta", backend=backend)
        set_module(model, name, layer)
    _check_state(info, model, state)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{root}: tensors not in the model: {result.unexpected_keys[:5]}")
    model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise CheckpointError(f"{root}: tensors missing from the checkpoint: {missing[:5]}")
    model.config.quantization_config = qcfg
    cast_params(model, dtype or stored)
    model = model.to(device).eval()
    if torch.device(device).type == "cpu" and backend in (Backend.AUTO, Backend.CPU):
        from gift_quant.kernels.cpu import set_cpu_head

        set_cpu_head(model)  # the output Linear from an fp16 copy in CPU inference (exact)
    return model
