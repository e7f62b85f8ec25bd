"""Read mixed-precision exports (and plain GPTQ checkpoints) back into MixedLinear models.

Everything is validated from the files' headers before the model is built: a missing or
truncated file, a missing salient tensor, a wrong shape or dtype, an unknown format version --
each is a :class:`CheckpointError` naming the file and the tensor. Then the bytes: an export
with a ``manifest.json`` is checked against its SHA-256 digests (``verify=False`` skips this),
every tensor the model expects must be in the files, and no weight may hold NaN or inf.
Only JSON and safetensors are read; nothing is unpickled.

"A model directory" means any of: an export (``quantize``, ``recover``'s ``model/``), a
``recover`` output directory (its final model), or a ``gptq+lora`` export, whose one-hot
adapter is folded back into the salient columns it encodes.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from gift_quant.io.export import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    QUANT_METHOD,
    file_digest,
    tensor_digests,
    zeros_from_file,
)
from gift_quant.io.gptq_lora import ADAPTER_DIR
from gift_quant.kernels import Backend
from gift_quant.mixed_linear import MixedLinear
from gift_quant.modeling import cast_params, set_module

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "inspect_checkpoint",
    "load_quantized",
    "resolve_model_dir",
    "verify_manifest",
]

log = logging.getLogger(__name__)
_SKIP = "--no-verify / verify=False skips this check"

_DTYPE_NAMES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "I32": torch.int32,
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or inconsistent; the message names it."""


@dataclass
class CheckpointInfo:
    """What a checkpoint directory holds, read from its JSON files and safetensors headers."""

    path: Path
    config: dict
    kind: str  # "gift_quant" or "gptq" (a plain GPTQ checkpoint: no salient columns)
    checkpoint_format: str  # "gptq" (v1, zeros stored minus 1) or "gptq_v2"
    modules: dict[str, dict]  # name -> bits, group_size, sym, num_salient, in/out_features, bias
    tensors: dict[str, tuple[str, list[int], str]] = field(
        default_factory=dict
    )  # name -> file, shape, dtype
    salient_file: str | None = None
    adapter: dict | None = None  # gptq+lora export: the salient_lora/ adapter_config.json

    @property
    def files(self) -> list[str]:
        return sorted({f for f, _, _ in self.tensors.values()})


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a JSON object was expected, got {type(data).__name__}")
    return data


def _headers(path: Path) -> dict[str, tuple[list[int], str]]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        with safe_open(path, framework="pt") as f:
            return {
                k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()
            }
    except Exception as exc:  # safetensors raises its own error type for bad headers
        raise CheckpointError(
            f"{path}: unreadable safetensors file, truncated or corrupt ({exc})"
        ) from exc


def is_recover_run(root: Path) -> bool:
    """A ``recover`` output directory (its recipe and quantized start), not an export."""
    return (
        not (root / "config.json").is_file()
        and (root / "recipe.yaml").is_file()
        and (root / "quantized").is_dir()
    )


def resolve_model_dir(path: str | Path) -> Path:
    """The export directory that ``path`` names: itself, or a recover run's final model.

    A run trained with LoRA has no single export (its model is ``quantized/`` + a PEFT
    adapter), and an unfinished run has no final model yet: both are refused by name.
    """
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such path; give an export or recover output directory")
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory; give an export directory")
    if (root / "model.onnx").is_file() and not (root / "model.safetensors").is_file():
        raise CheckpointError(
            f"{root} is an ONNX export (model.onnx) for onnxruntime; eval, inspect and export "
            f"take the safetensors export it was made from"
        )
    if (root / "config.json").is_file():
        return root
    if is_recover_run(root):
        if (root / "lora_adapter").is_dir():
            raise CheckpointError(
                f"{root} is a train.method=lora run: its model is {root / 'quantized'} plus "
                f"the PEFT adapter {root / 'lora_adapter'}; `eval {root}` applies both"
            )
        if (root / "model" / "config.json").is_file():
            return root / "model"
        report = root / "report.json"
        if report.is_file() and _read_json(report).get("model_dir") == str(root / "quantized"):
            return root / "quantized"  # a run without training: the quantized start is final
        raise CheckpointError(
            f"{root}: the recover run has no final model yet; rerun the same recover command "
            f"to finish it (or give {root / 'quantized'} for the quantized start)"
        )
    raise CheckpointError(
        f"{root}: no config.json; this is not a model directory (empty or partial?)"
    )


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Validate a checkpoint directory from its metadata alone and describe it."""
    root = resolve_model_dir(path)
    cfg_path = root / "config.json"
    config = _read_json(cfg_path)
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict):
        raise CheckpointError(
            f"{cfg_path}: no quantization_config; this is a full-precision model, not a "
            f"quantized checkpoint (`eval --model {root}` scores it, `quantize --model {root} "
            f"--out Q` quantizes it)"
        )
    method = qcfg.get("quant_method")
    if method == QUANT_METHOD:
        if qcfg.get("format") != FORMAT:
            raise CheckpointError(f"{cfg_path}: format {qcfg.get('format')!r} is not {FORMAT!r}")
        version = qcfg.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise CheckpointError(f"{cfg_path}: invalid format_version {version!r}")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{cfg_path}: format_version {version} is newer than this gift_quant reads "
                f"({FORMAT_VERSION}); upgrade gift_quant"
            )
        modules = qcfg.get("modules")
        if not isinstance(modules, dict) or not modules:
            raise CheckpointError(f"{cfg_path}: quantization_config has no modules")
    elif method == "gptq":
        modules = {}
    else:
        raise CheckpointError(
            f"{cfg_path}: unsupported quant_method {method!r} (gift_quant or gptq)"
        )
    fmt = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
    if method == "gptq" and fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{cfg_path}: GPTQ format {fmt!r} is not supported (gptq, gptq_v2)")
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{cfg_path}: checkpoint_format {fmt!r} is not gptq or gptq_v2")

    index = root / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = [MODEL_FILE]
    tensors = {}
    for name in files:
        for key, (shape, dtype) in _headers(root / name).items():
            tensors[key] = (name, shape, dtype)
    info = CheckpointInfo(root, config, method, fmt, modules, tensors)

    if method == "gptq":  # plain GPTQ: every module with a qweight, one global grid
        bits, group = int(qcfg["bits"]), int(qcfg.get("group_size", -1))
        for key, (_, shape, _) in tensors.items():
            if key.endswith(".qweight"):
                mod = key[: -len(".qweight")]
                modules[mod] = {
                    "bits": bits,
                    "group_size": group,
                    "sym": bool(qcfg.get("sym", True)),
                    "num_salient": 0,
                    "in_features": shape[0] * 32 // bits,
                    "out_features": shape[1],
                    "bias": f"{mod}.bias" in tensors,
                }
        if (root / ADAPTER_DIR).is_dir():
            info.adapter = _adapter_config(root / ADAPTER_DIR, modules)
    else:
        info.salient_file = qcfg.get("salient_file", "salient.safetensors")
        salient_path = root / info.salient_file
        if not salient_path.is_file():
            raise CheckpointError(
                f"{salient_path} is missing: it holds the FP16 salient columns, without which "
                f"the model is incomplete; re-export the checkpoint"
            )
        for key, (shape, dtype) in _headers(salient_path).items():
            tensors[key] = (info.salient_file, shape, dtype)
    for name, spec in modules.items():
        _check_module(info, name, spec)
    return info


def _check_module(info: CheckpointInfo, name: str, spec: dict) -> None:
    bits, group, K, N, k = (
        spec["bits"],
        spec["group_size"],
        spec["in_features"],
        spec["out_features"],
        spec["num_salient"],
    )
    G = 1 if group == -1 else K // group
    expected = {
        "qweight": ([K * bits // 32, N], "I32"),
        "qzeros": ([G, N * bits // 32], "I32"),
        "scales": ([G, N], "F16"),
        "g_idx": ([K], "I32"),
    }
    if info.kind == QUANT_METHOD:
        expected["salient_idx"] = ([k], "I32")
        expected["salient_weight"] = ([N, k], "F16")
    if spec.get("bias"):
        expected["bias"] = ([N], None)
    for field_name, (shape, dtype) in expected.items():
        key = f"{name}.{field_name}"
        if key not in info.tensors:
            where = info.salient_file if field_name.startswith("salient") else ", ".join(info.files)
            raise CheckpointError(f"{info.path / where}: tensor {key!r} is missing")
        file, got_shape, got_dtype = info.tensors[key]
        if got_shape != shape or (dtype is not None and got_dtype != dtype):
            raise CheckpointError(
                f"{info.path / file}: tensor {key!r} is {got_dtype}{got_shape}, "
                f"expected {dtype or 'float'}{shape}"
            )


def _adapter_config(adapter_dir: Path, modules: dict) -> dict:
    """The salient-column adapter of a gptq+lora export, checked to be one we can fold back."""
    cfg = _read_json(adapter_dir / "adapter_config.json")
    if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{adapter_dir}: not a gift_quant salient-column adapter (DoRA/rsLoRA/non-LoRA); "
            f"apply it with PEFT instead"
        )
    unknown = sorted(set(cfg.get("target_modules") or ()) - set(modules))
    if unknown:
        raise CheckpointError(f"{adapter_dir}: adapter targets {unknown[:3]} are not GPTQ layers")
    return cfg


def _fold_adapter(info: CheckpointInfo, state: dict) -> None:
    """Turn the one-hot LoRA of a gptq+lora export back into salient columns (exact: A's rows
    select input columns, B holds their FP16 weights, scaling alpha / r)."""
    adapter = info.path / ADAPTER_DIR
    file = adapter / "adapter_model.safetensors"
    _headers(file)
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


def verify_manifest(root: Path) -> None:
    """Compare every file with the SHA-256 recorded at export; a changed safetensors file is
    narrowed down to the tensor whose bytes changed."""
    path = root / MANIFEST_FILE
    if not path.is_file():
        log.info("%s: no %s (written before integrity checks); not verified", root, MANIFEST_FILE)
        return
    manifest = _read_json(path)
    for rel, digest in manifest.get("files", {}).items():
        file = root / rel
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {MANIFEST_FILE})")
        if file_digest(file) == digest:
            continue
        expected = manifest.get("tensors", {}).get(rel, {})
        try:
            got = tensor_digests(file) if expected else {}
        except (struct.error, ValueError, KeyError, OSError):
            got = None
        changed = [k for k, v in expected.items() if got is not None and got.get(k) != v]
        if got is None:
            what = "its safetensors header is unreadable (truncated or corrupt)"
        elif changed and changed[0] not in got:
            what = f"tensor {changed[0]!r} is missing"
        elif changed:
            what = f"tensor {changed[0]!r} does not match its SHA-256 in {MANIFEST_FILE}"
        elif expected:
            what = "its header (tensor names, shapes or dtypes) differs from the exported one"
        else:
            what = f"the file does not match its SHA-256 in {MANIFEST_FILE}"
        raise CheckpointError(
            f"{file}: {what} (corrupt or modified since export); re-export it ({_SKIP})"
        )


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

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5.20 keeps it here
        from transformers.modeling_utils import no_init_weights

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
    stored = _stored_dtype(info)
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


def _stored_dtype(info: CheckpointInfo) -> torch.dtype:
    """dtype of the unquantized floating tensors (the model dtype at export)."""
    for key, (_, _, dtype) in info.tensors.items():
        if dtype in ("F16", "BF16", "F32") and not key.endswith((".scales", ".salient_weight")):
            return _DTYPE_NAMES[dtype]
    return torch.float16
