"""Write mixed-precision checkpoints: GPTQ tensors + FP16 salient columns, atomically.

Layout of an export directory (format ``gift_quant.mixed``, version 1):

    config.json               model config + quantization_config (quant_method "gift_quant")
    quantize_config.json      the GPTQ block for GPTQ readers (bits, group_size, sym, format)
    model.safetensors         GPTQ v1/v2 tensors of every quantized Linear (qweight, qzeros,
                              scales, g_idx, bias) and every other tensor in the model dtype;
                              large models: model-0000i-of-0000n.safetensors + index json
    salient.safetensors       <module>.salient_idx int32 [k] (sorted) and
                              <module>.salient_weight fp16 [out, k]; kept apart from the GPTQ
                              file so stock GPTQ loaders cannot silently drop them
    tokenizer files, recipe.yaml, report.json
    manifest.json             SHA-256 of every other file, and of every tensor's bytes in each
                              safetensors file, so a reader can name what changed

Zero-points: ``checkpoint_format "gptq"`` (v1) stores z - 1, the universally read convention;
it is written for symmetric grids, where z = 2**(bits-1) and nothing can overflow.
Asymmetric grids are written as ``"gptq_v2"`` (z as is) because a true zero-point of 0 would
wrap around in v1. ``export.checkpoint_format`` can force either; forcing v1 on a layer with a
zero-point of 0 is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from gift_quant.files import follow_umask
from gift_quant.fused import is_fused
from gift_quant.mixed_linear import MixedLinear
from gift_quant.quant.packing import pack_cols, unpack_cols
from gift_quant.version import __version__

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "SALIENT_FILE",
    "atomic_directory",
    "checkpoint_tensors",
    "export_bytes",
    "gptq_block",
    "save_quantized",
    "stale_partials",
    "tensor_digests",
    "write_manifest",
    "write_model_files",
    "zeros_to_file",
]

FORMAT = "gift_quant.mixed"
FORMAT_VERSION = 1
QUANT_METHOD = "gift_quant"
SALIENT_FILE = "salient.safetensors"
MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MANIFEST_FILE = "manifest.json"
GPTQ_FIELDS = ("qweight", "qzeros", "scales", "g_idx")


class atomic_directory:
    """Context manager: write into a hidden sibling, rename onto ``target`` only on success.

    ``target`` must not exist (nothing is ever overwritten); on any error the partial sibling
    is removed and ``target`` is untouched.
    """

    def __init__(self, target: str | Path) -> None:
        self.target = Path(target)

    def __enter__(self) -> Path:
        if self.target.exists():
            raise FileExistsError(
                f"{self.target} already exists; choose a new --out directory or remove it first"
            )
        if not self.target.parent.is_dir():
            raise FileNotFoundError(f"parent directory {self.target.parent} does not exist")
        for stale in stale_partials(self.target.parent, self.target.name):
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                follow_umask(self.tmp)  # safetensors writes 0600
                os.rename(self.tmp, self.target)  # atomic on one filesystem
            except OSError:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def stale_partials(parent: Path, name: str = "*") -> list[Path]:
    """The hidden partial siblings ``.<name>.partial-<pid>`` in ``parent`` whose writer no
    longer runs (a killed run's; the next write of the same target removes them)."""
    stale = []
    for path in parent.glob(f".{name}.partial-*"):
        pid = path.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            stale.append(path)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_digests(path: Path) -> dict[str, str]:
    """SHA-256 of each tensor's bytes in a safetensors file, located by its header's offsets."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        digests = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            f.seek(base + start)
            digests[name] = hashlib.sha256(f.read(end - start)).hexdigest()
    return digests


def write_manifest(root: Path) -> None:
    """``manifest.json``: SHA-256 of every file under ``root`` and of every tensor in its
    safetensors files, so loading can verify the export and name a changed tensor."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {
        "algorithm": "sha256",
        "files": {p.relative_to(root).as_posix(): file_digest(p) for p in files},
        "tensors": {
            p.relative_to(root).as_posix(): tensor_digests(p)
            for p in files
            if p.suffix == ".safetensors"
        },
    }
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def safetensors_header() -> dict[str, str]:
    """File-level metadata: "format": "pt" is what transformers/accelerate require to load."""
    return {"format": "pt", "gift_quant_format": FORMAT, "gift_quant_version": __version__}


def resolve_checkpoint_format(requested: str, layers: dict[str, MixedLinear]) -> str:
    if requested != "auto":
        return requested
    return "gptq" if all(layer.sym for layer in layers.values()) else "gptq_v2"


def zeros_to_file(
    qzeros: torch.Tensor, bits: int, checkpoint_format: str, name: str = ""
) -> torch.Tensor:
    """True zero-points (packed) -> the file convention (v1 stores z - 1)."""
    if checkpoint_format == "gptq_v2":
        return qzeros
    z = unpack_cols(qzeros, bits)
    if bool((z == 0).any()):
        raise ValueError(
            f"{name}: a zero-point of 0 cannot be stored in GPTQ v1 (it wraps to 2**bits); "
            f"use export.checkpoint_format=gptq_v2 (or auto)"
        )
    return pack_cols(z - 1, bits)


def zeros_from_file(qzeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    """The file convention -> true zero-points (packed). v1 readers add 1 (mod 2**bits)."""
    if checkpoint_format == "gptq_v2":
        return qzeros
    return pack_cols((unpack_cols(qzeros, bits) + 1) & ((1 << bits) - 1), bits)


def quantized_layers(model: nn.Module) -> dict[str, MixedLinear]:
    """The MixedLinear layers by name; a fused model (``fuse_siblings``) is refused, since its
    layers no longer stand where the model's own do."""
    if is_fused(model):
        raise ValueError(
            "the model's sibling layers are fused (fuse_siblings): export it before fusing"
        )
    return {n: m for n, m in model.named_modules() if isinstance(m, MixedLinear)}


def gptq_block(layers: dict[str, MixedLinear], checkpoint_format: str) -> dict:
    """The portable GPTQ config block (docs/FORMAT.md#quantize_configjson)."""
    first = next(iter(layers.values()))
    desc_act = any(_desc_act(layer) for layer in layers.values())
    return {
        "quant_method": "gptq",
        "bits": first.bits,
        "group_size": first.group_size,
        "desc_act": desc_act,
        "sym": first.sym,
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {"quantizer": [f"gift_quant:{__version__}"]},
    }


def _desc_act(layer: MixedLinear) -> bool:
    g = layer.in_features if layer.group_size == -1 else layer.group_size
    trivial = torch.arange(layer.in_features, dtype=torch.int32) // g
    return not torch.equal(layer.g_idx.cpu(), trivial)


def checkpoint_tensors(
    model: nn.Module, checkpoint_format: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(main, salient) tensors of a model with MixedLinear layers, on the CPU.

    main: GPTQ tensors of every MixedLinear (zeros in the file convention) and every other
    parameter/buffer of the state dict (tied tensors once); salient: salient_idx/weight.
    """
    layers = quantized_layers(model)
    main: dict[str, torch.Tensor] = {}
    salient: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for field in GPTQ_FIELDS:
            t = getattr(layer, field)
            if field == "qzeros":
                t = zeros_to_file(t, layer.bits, checkpoint_format, name)
            main[f"{name}.{field}"] = t
        if layer.bias is not None:
            main[f"{name}.bias"] = layer.bias
        salient[f"{name}.salient_idx"] = layer.salient_idx
        salient[f"{name}.salient_weight"] = layer.salient_weight
    skip = {id(t) for layer in layers.values() for t in layer.state_dict(keep_vars=True).values()}
    seen_storage: set[int] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in skip:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage:  # tied weights (lm_head = embed_tokens): stored once
            continue
        seen_storage.add(ptr)
        main[key] = t

    def cpu(d):
        return {k: v.detach().cpu().contiguous() for k, v in d.items()}

    return cpu(main), cpu(salient)


def export_bytes(model: nn.Module, plan: dict[str, int], quant, dtype: torch.dtype) -> int:
    """Tensor bytes of the export of ``model`` -- full precision; its skeleton on the meta
    device is enough -- once the Linears named in ``plan`` (name -> salient columns) are
    quantized as ``quant`` says: their tensors as :class:`MixedLinear` holds them, every other
    tensor of the state dict once (tied weights are one tensor) in ``dtype``. The files add
    only their headers, the JSON files and the tokenizer."""
    total, skip = 0, set()
    for name, k in plan.items():
        linear = model.get_submodule(name)
        layer = MixedLinear(
            linear.in_features,
            linear.out_features,
            bits=quant.bits,
            group_size=quant.group_size,
            num_salient=k,
            bias=linear.bias is not None,
            sym=quant.sym,
            dtype=dtype,
            device="meta",
        )
        total += sum(t.numel() * t.element_size() for t in layer.state_dict().values())
        skip.update(id(t) for t in linear.state_dict(keep_vars=True).values())
    seen: set[int] = set()
    for t in model.state_dict(keep_vars=True).values():
        if id(t) in skip or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
    return total


def write_model_files(
    tmp: Path, model: nn.Module, main: dict, quantization_config: dict, tokenizer, max_shard_bytes
) -> None:
    """Weights (sharded when large), config.json with ``quantization_config``, generation
    config and tokenizer into ``tmp``."""
    header = safetensors_header()
    _save_sharded(main, tmp, header, max_shard_bytes)
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def save_quantized(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer=None,
    recipe=None,
    report: dict | None = None,
    checkpoint_format: str = "auto",
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Export a model whose target Linears are MixedLinear (see module docstring)."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no quantized (MixedLinear) layers to export")
    fmt = resolve_checkpoint_format(checkpoint_format, layers)
    main, salient = checkpoint_tensors(model, fmt)
    qcfg = {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint_format": fmt,
        "pack_dtype": "int32",
        "salient_file": SALIENT_FILE,
        "gift_quant_version": __version__,
        "modules": {
            name: {
                "bits": layer.bits,
                "group_size": layer.group_size,
                "sym": layer.sym,
                "num_salient": layer.num_salient,
                "in_features": layer.in_features,
                "out_features": layer.out_features,
                "bias": layer.bias is not None,
            }
            for name, layer in layers.items()
        },
    }
    header = safetensors_header()
    with atomic_directory(out_dir) as tmp:
        write_model_files(tmp, model, main, qcfg, tokenizer, max_shard_bytes)
        save_file(salient, tmp / SALIENT_FILE, metadata=header)
        gptq = gptq_block(layers, fmt)
        gptq["meta"]["salient_file"] = SALIENT_FILE
        (tmp / "quantize_config.json").write_text(json.dumps(gptq, indent=2) + "\n")
        if recipe is not None:
            (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_manifest(tmp)
    return Path(out_dir)


def _save_sharded(
    tensors: dict[str, torch.Tensor], out: Path, header: dict, max_bytes: int
) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out / MODEL_FILE, metadata=header)
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata=header)
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
