"""Loading Hugging Face causal LMs and finding their decoder blocks and target Linears.

Architecture knowledge is structural: the decoder blocks are the largest ``nn.ModuleList`` of
same-type modules that hold Linears; the targets are the Linears inside them that match the
recipe's include/exclude regexes. No per-family files.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from gift_quant.assets import default_model_dir, load_gguf
from gift_quant.mixed_linear import MixedLinear

log = logging.getLogger(__name__)

__all__ = [
    "cast_params",
    "check_context",
    "decoder_blocks",
    "find_targets",
    "load_model",
    "resolve_device",
    "set_module",
]

LINEARS = (nn.Linear, MixedLinear)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "*.model")


def check_tokenizer_files(path: Path, name: str) -> None:
    """A local model directory holds a tokenizer's vocabulary (transformers would otherwise
    ask for sentencepiece or tiktoken, as if a package were missing): tokenizer.json, a
    sentencepiece or tiktoken model, or a vocabulary file."""
    if not path.is_dir():
        return
    patterns = (*TOKENIZER_FILES, "*.tiktoken", "vocab*", "merges.txt")
    if not any(f.is_file() for p in patterns for f in path.glob(p)):
        raise FileNotFoundError(
            f"model {name!r}: no tokenizer files there (one of {', '.join(TOKENIZER_FILES)}, "
            f"...); copy them from the model it was saved from"
        )


def check_context(model: nn.Module | dict, seq_len: int, key: str) -> None:
    """Refuse windows longer than the model's context before any work is done on them
    (``model``: a model, or its config.json as a dict)."""
    if isinstance(model, dict):
        limit = model.get("max_position_embeddings")
    else:
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(
            f"{key}={seq_len} exceeds the model's context (max_position_embeddings={limit}); "
            f"use {key} <= {limit}"
        )


def check_context_file(model_dir: Path, seq_len: int, key: str) -> None:
    """:func:`check_context` from ``model_dir/config.json`` before any weight loads; a path it
    cannot read, or a config.json that is not a JSON object, is left to the loader, which names
    what is wrong with it."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):  # missing, unreadable, a name too long, not JSON
        return
    if isinstance(config, dict):
        check_context(config, seq_len, key)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={spec!r} but no CUDA device is visible; use cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Compute dtype; "auto" = bfloat16 where the hardware multiplies it natively (GPUs, CPUs
    with AVX512-BF16 or AMX), float32 elsewhere: on an AVX2-only CPU a bfloat16 matmul is
    emulated, 6-70x slower than float32 depending on the operand layout."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if native else torch.float32
    return torch.bfloat16


def load_model(cfg, dtype: torch.dtype | None = None):
    """Load the model and tokenizer named by a ``ModelConfig``.

    ``name_or_path`` is "" (embedded default), a directory, a ``.gguf`` file, or a hub id.
    Returns ``(model, tokenizer)`` on the CPU in eval mode, in ``dtype`` (default: cfg.dtype).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or DTYPES[cfg.dtype]
    name = cfg.name_or_path
    if not name:
        name = str(default_model_dir())
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or cfg.gguf_file:
        gguf = path if path.suffix == ".gguf" else path / cfg.gguf_file
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {str(gguf)!r} does not exist")
        return load_gguf(gguf.parent, gguf.name, dtype=dtype)
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name!r}: no config.json there; give a Hugging Face model directory, "
            f"a .gguf file, a hub id, or nothing for the embedded default"
        )
    if looks_local:
        check_tokenizer_files(path, name)
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except OSError as exc:
        if looks_local:
            raise
        raise OSError(
            f"could not load {name!r} from the hub (offline, or not a causal LM); "
            f"download it first or give a local directory"
        ) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder blocks: ``(qualified name, ModuleList)``.

    The ModuleList with the most parameters and buffers among those whose children all share
    one type and contain at least one ``nn.Linear`` (or an already quantized MixedLinear).
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(m, LINEARS) for m in module[0].modules()):
            continue
        size = sum(t.numel() for t in [*module.parameters(), *module.buffers()])
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__}: found no ModuleList of decoder blocks holding Linears"
        )
    return best[1], best[2]


def find_targets(
    block: nn.Module, prefix: str, include: tuple[str, ...], exclude: tuple[str, ...]
) -> dict[str, nn.Linear]:
    """Linears inside ``block`` whose full name (``prefix.sub.name``) matches ``include`` and
    not ``exclude`` (``re.search``), in module order."""
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    targets = {}
    for sub, module in block.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        full = f"{prefix}.{sub}"
        if any(p.search(full) for p in inc) and not any(p.search(full) for p in exc):
            targets[full] = module
    return targets


def cast_params(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters (MixedLinear biases included) to ``dtype`` in place.

    Unlike ``model.to(dtype)`` this leaves buffers alone: rotary ``inv_freq`` stays float32 as
    ``from_pretrained(dtype=...)`` leaves it, and MixedLinear keeps its stored format.
    """
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
