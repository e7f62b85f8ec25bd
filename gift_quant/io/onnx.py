"""ONNX export of a mixed-precision checkpoint, for onnxruntime on a CPU (the ``[onnx]`` extra).

Every MixedLinear becomes onnxruntime's contrib op ``com.microsoft::MatMulNBits`` (4-bit codes
packed two per byte, low nibble first, as B [N, K/block, block/2]; fp32 scales [N * K/block];
zero-points packed two per byte per row, [N * ceil(K/block / 2)]; block = our group size),
plus the FP16 salient columns as an exact side product: ``Gather`` of the k input columns,
``MatMul`` with W_S^T, ``Add``. 2- and 3-bit codes are 4-bit codes with the same zero-point,
so widening them is lossless (the model file then stores 4 bits per weight).

The graph is the decoder with a KV cache, the inputs and outputs optimum and onnxruntime-genai
use: ``input_ids`` [batch, seq], ``attention_mask`` [batch, past + seq],
``past_key_values.{i}.key|value`` [batch, kv_heads, past, head_dim] (past may be 0 for the
prefill) -> ``logits`` [batch, seq, vocab], ``present.{i}.key|value``. Everything but the
quantized Linears is computed in fp32. Positions come from the cache length, so a batch must
not be left-padded (batch 1, or right-padded prompts of equal length).

The salient columns are written in fp16 where every value is an fp16 value (an export's are),
widened by a ``Cast`` that onnxruntime folds when it loads the model; the token embedding and
output matrix as ``onnx_tables`` writes them (fp16, or 8-bit codes with ``table_bits=8``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from gift_quant.io.checkpoint import CheckpointError
from gift_quant.io.export import atomic_directory
from gift_quant.io.onnx_tables import TABLE_BITS, narrowest, use_tables
from gift_quant.mixed_linear import MixedLinear
from gift_quant.modeling import set_module
from gift_quant.quant.packing import unpack_cols, unpack_rows

__all__ = ["ONNX_FILE", "export_onnx", "onnx_unsupported", "pack_matmul_nbits"]

ONNX_FILE = "model.onnx"
REPORT_FILE = "onnx_export.json"
OPSET = 18


def onnx_unsupported(layer: MixedLinear) -> str | None:
    """Why ``layer`` cannot become an exact MatMulNBits, or None when it can."""
    K = layer.in_features
    block = K if layer.group_size == -1 else layer.group_size
    if layer.bits > 4:
        return f"{layer.bits}-bit codes (MatMulNBits here takes 2, 3 or 4 bits, widened to 4)"
    if block < 16 or block & (block - 1):
        return f"group size {block} (MatMulNBits needs a power of two >= 16)"
    trivial = torch.arange(K, dtype=torch.int32) // block
    if not torch.equal(layer.g_idx.cpu(), trivial):
        return "act-order g_idx (groups are not contiguous runs of group_size columns)"
    return None


def _nibbles(codes: Tensor) -> Tensor:
    """uint8 codes [..., 2m] in [0, 16) -> bytes [..., m], element 2j in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def pack_matmul_nbits(layer: MixedLinear) -> dict[str, Tensor]:
    """The MatMulNBits initializers of ``layer`` (4-bit codes, fp32 scales, packed zeros)."""
    K, N = layer.in_features, layer.out_features
    block = K if layer.group_size == -1 else layer.group_size
    blocks = K // block
    codes = unpack_rows(layer.qweight.cpu(), layer.bits).t().to(torch.int64)  # [N, K]
    zeros = unpack_cols(layer.qzeros.cpu(), layer.bits).t().to(torch.int64)  # [N, G]
    if blocks % 2:  # a row of zero-points is padded to whole bytes
        zeros = torch.cat([zeros, torch.zeros(N, 1, dtype=torch.int64)], dim=1)
    return {
        "weight": _nibbles(codes).reshape(N, blocks, block // 2).contiguous(),
        "scales": layer.scales.cpu().float().t().reshape(-1).contiguous(),
        "zero_points": _nibbles(zeros).reshape(-1).contiguous(),
    }


def matmul_nbits(
    x: Tensor, weight: Tensor, scales: Tensor, zero_points: Tensor, K: int, N: int, block_size: int
) -> Tensor:
    """``x @ W^T`` for W in MatMulNBits' 4-bit layout: during ``torch.onnx.export`` the
    contrib op itself, otherwise its eager form (dequantize, matmul)."""
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(
            "com.microsoft::MatMulNBits",
            (x, weight, scales, zero_points),
            {"K": K, "N": N, "bits": 4, "block_size": block_size},
            dtype=x.dtype,
            shape=(*x.shape[:-1], N),
            version=1,
        )
    blocks = K // block_size
    codes = torch.stack([weight & 15, weight >> 4], dim=-1).reshape(N, blocks, block_size)
    zp = torch.stack([zero_points & 15, zero_points >> 4], dim=-1).reshape(N, -1)[:, :blocks]
    w = (codes.float() - zp.float().unsqueeze(-1)) * scales.reshape(N, blocks, 1)
    return x @ w.reshape(N, K).t().to(x.dtype)


class OnnxMixedLinear(nn.Module):
    """The exported form of a MixedLinear: MatMulNBits + Gather/MatMul/Add salient product."""

    def __init__(self, layer: MixedLinear) -> None:
        super().__init__()
        self.K, self.N = layer.in_features, layer.out_features
        self.block_size = self.K if layer.group_size == -1 else layer.group_size
        for name, t in pack_matmul_nbits(layer).items():
            self.register_buffer(name, t)
        self.register_buffer("salient_idx", layer.salient_idx.cpu().long())
        self.register_buffer("salient_weight_t", narrowest(layer.salient_weight.cpu().t()))
        bias = None if layer.bias is None else layer.bias.detach().cpu().float().clone()
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        y = matmul_nbits(
            x, self.weight, self.scales, self.zero_points, self.K, self.N, self.block_size
        )
        if self.salient_idx.numel():
            y = y + torch.index_select(x, -1, self.salient_idx) @ self.salient_weight_t.float()
        if self.bias is not None:
            y = y + self.bias
        return y


class DecoderWithPast(nn.Module):
    """``(input_ids, attention_mask, *past) -> (logits, *present)`` with flat KV tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *past: Tensor):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def kv_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def kv_shape(config) -> tuple[int, int]:
    """(kv heads, head dim) of a decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def check_exportable(model: nn.Module, root: Path) -> dict[str, int]:
    """Refuse (CheckpointError) any layer MatMulNBits cannot compute exactly; returns the
    count of layers per stored bit width."""
    bits: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, MixedLinear):
            reason = onnx_unsupported(m)
            if reason is not None:
                raise CheckpointError(
                    f"{root}: layer {name} cannot be exported to ONNX exactly: {reason}; "
                    f"re-quantize with 2-4 bits, contiguous groups (no act-order) and a "
                    f"power-of-two group size"
                )
            bits[str(m.bits)] = bits.get(str(m.bits), 0) + 1
    if not bits:
        raise CheckpointError(f"{root}: no quantized layers to export")
    return bits


def export_onnx(
    src: str | Path,
    out: str | Path,
    *,
    tokenizer_files: bool = True,
    verify: bool = True,
    table_bits: int = 16,
) -> dict:
    """Export the checkpoint ``src`` to ``out``/model.onnx (+ config, tokenizer, report);
    ``table_bits``: the embedding and output matrix in fp16 (16) or 8-bit codes (8).

    Checks the target and every layer first; writes into a hidden sibling renamed onto ``out``
    at the end, so a failed export leaves nothing behind. Returns the export report.
    """
    from gift_quant.io.load import load_quantized

    src, out = Path(src), Path(out)
    if table_bits not in TABLE_BITS:
        raise ValueError(f"--table-bits {table_bits}: use one of {TABLE_BITS}")
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new --out directory or remove it")
    model = load_quantized(src, dtype=torch.float32, verify=verify)
    stored_bits = check_exportable(model, src)
    for name, m in list(model.named_modules()):
        if isinstance(m, MixedLinear):
            set_module(model, name, OnnxMixedLinear(m))
    tables = use_tables(model, table_bits)
    model.config.use_cache = True
    wrapper = DecoderWithPast(model).eval()
    L = wrapper.num_layers
    kv_heads, head_dim = kv_shape(model.config)
    ids = torch.ones(1, 4, dtype=torch.long)
    past = [torch.zeros(1, kv_heads, 3, head_dim) for _ in range(2 * L)]
    mask = torch.ones(1, 7, dtype=torch.long)
    D = torch.export.Dim
    batch, seq, past_len = D("batch", max=1024), D("sequence", max=65536), D("past", max=65536)
    dynamic = (
        {0: batch, 1: seq},
        {0: batch, 1: D("total", max=131072)},
        tuple({0: batch, 2: past_len} for _ in range(2 * L)),
    )
    with atomic_directory(out) as tmp:
        program = torch.onnx.export(
            wrapper,
            (ids, mask, *past),
            dynamic_shapes=dynamic,
            dynamo=True,
            input_names=["input_ids", "attention_mask", *kv_names(L, "past_key_values")],
            output_names=["logits", *kv_names(L, "present")],
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
        program.save(tmp / ONNX_FILE)
        for name in ("config.json", "generation_config.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if tokenizer_files:
            for f in src.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                    shutil.copy2(f, tmp / f.name)
        widened = {b: n for b, n in stored_bits.items() if b in ("2", "3")}
        report = {
            "format": "onnx",
            "source": str(src),
            "file": ONNX_FILE,
            "opset": OPSET,
            "quantized_op": "com.microsoft::MatMulNBits (bits=4)",
            "layers_by_stored_bits": stored_bits,
            "widened_to_4_bits": widened,
            "note": (
                f"{sum(widened.values())} layers stored at 2/3 bits are written as 4-bit "
                f"MatMulNBits codes (lossless; 4 bits per weight on disk)"
                if widened
                else "all quantized layers are 4-bit"
            ),
            "tables": tables,
            "kv_cache": {"num_layers": L, "kv_heads": kv_heads, "head_dim": head_dim},
            "inputs": ["input_ids", "attention_mask", "past_key_values.{i}.key|value"],
            "outputs": ["logits", "present.{i}.key|value"],
        }
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    files = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    report["bytes"] = sum(v for k, v in files.items() if k.startswith(ONNX_FILE))
    return report
