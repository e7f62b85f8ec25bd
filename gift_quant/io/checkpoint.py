"""Checking a model directory before anything is loaded: what it is (an export, a ``recover``
output directory, a plain GPTQ checkpoint, a ``gptq+lora`` export), and that its files hold what
its config says -- from the JSON files and the safetensors headers alone -- and, for an export
with a ``manifest.json``, that every file still has the SHA-256 recorded at export.

Each problem is a :class:`CheckpointError` naming the file and the tensor. Only JSON and
safetensors headers are read; nothing is unpickled. ``io.load`` builds the model afterwards.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from gift_quant.io.export import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    QUANT_METHOD,
    file_digest,
    tensor_digests,
)
from gift_quant.io.gptq_lora import ADAPTER_DIR

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "inspect_checkpoint",
    "is_recover_run",
    "read_headers",
    "resolve_model_dir",
    "stored_dtype",
    "tensor_bytes",
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


def read_json(path: Path) -> dict:
    """A JSON object file (a missing file raises FileNotFoundError, anything else unreadable
    a CheckpointError)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a JSON object was expected, got {type(data).__name__}")
    return data


def read_headers(path: Path) -> dict[str, tuple[list[int], str]]:
    """{tensor: (shape, dtype)} of a safetensors file, from its header alone."""
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
        if report.is_file() and read_json(report).get("model_dir") == str(root / "quantized"):
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
    config = read_json(cfg_path)
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
        weight_map = read_json(index).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = [MODEL_FILE]
    tensors = {}
    for name in files:
        for key, (shape, dtype) in read_headers(root / name).items():
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
        for key, (shape, dtype) in read_headers(salient_path).items():
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
    cfg = read_json(adapter_dir / "adapter_config.json")
    if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{adapter_dir}: not a gift_quant salient-column adapter (DoRA/rsLoRA/non-LoRA); "
            f"apply it with PEFT instead"
        )
    unknown = sorted(set(cfg.get("target_modules") or ()) - set(modules))
    if unknown:
        raise CheckpointError(f"{adapter_dir}: adapter targets {unknown[:3]} are not GPTQ layers")
    return cfg


def verify_manifest(root: Path) -> None:
    """Compare every file with the SHA-256 recorded at export; a changed safetensors file is
    narrowed down to the tensor whose bytes changed."""
    path = root / MANIFEST_FILE
    if not path.is_file():
        log.info("%s: no %s (written before integrity checks); not verified", root, MANIFEST_FILE)
        return
    manifest = read_json(path)
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


def stored_dtype(info: CheckpointInfo) -> torch.dtype:
    """dtype of the unquantized floating tensors (the model dtype at export)."""
    for key, (_, _, dtype) in info.tensors.items():
        if dtype in ("F16", "BF16", "F32") and not key.endswith((".scales", ".salient_weight")):
            return _DTYPE_NAMES[dtype]
    return torch.float16


_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2}


def tensor_bytes(info: CheckpointInfo, salient: bool = True) -> int:
    """At least the tensor bytes that saving the model loaded from ``info`` writes again:
    every tensor the loader reads (without the salient columns' file unless ``salient``), a
    floating one at most at the size of the dtype the loader casts it to."""
    cast = stored_dtype(info).itemsize
    total = 0
    for file, shape, dtype in info.tensors.values():
        if not salient and file == info.salient_file:
            continue
        size = _ITEMSIZE.get(dtype, 1)
        if dtype in ("F64", "F32", "F16", "BF16"):
            size = min(size, cast)
        total += math.prod(shape) * size
    return total
