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

Tensors whose values are all fp16 values (an export stores its unquantized tensors in fp16) are
written in fp16 and widened by a ``Cast`` that onnxruntime folds when it loads the model: the
salient columns, and the token embedding and output matrix. Those two are written once,
transposed ([hidden, vocab]), which the output MatMul reads as it is and the embedding gathers
columns of, so a tied pair is one table in the file. In memory onnxruntime then keeps the fp16
table for the gather and one fp32 copy, packed, for the MatMul (with [vocab, hidden] and a
transposed copy for the MatMul it kept two fp32 copies).

``table_bits=8`` (opt-in, not exact) writes those two matrices instead as 8-bit codes per block
of ``TABLE_BLOCK`` values along the hidden size, each block with its fp32 scale and 8-bit
zero-point (round to nearest over the block's range, widened to include 0): the embedding is
``com.microsoft::GatherBlockQuantized`` and the output Linear an 8-bit ``MatMulNBits``, a tied
pair reading the same codes (onnxruntime 1.23 or later runs 8-bit GatherBlockQuantized). The
output MatMul runs at accuracy level 4, its input rounded to int8 per block: onnxruntime has
no fast 8-bit kernel for fp32 inputs (on an AVX2 CPU the 49152 x 576 head took 147 ms a call
that way, 0.6 ms at level 4). About a quarter of the fp32 table's memory; the logits then
differ from the checkpoint's by both roundings, which the report's ``tables`` entry says.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from gift_quant.io.checkpoint import CheckpointError
from gift_quant.io.export import atomic_directory
from gift_quant.kernels.cpu import set_cpu_head
from gift_quant.mixed_linear import MixedLinear
from gift_quant.modeling import set_module
from gift_quant.quant.packing import unpack_cols, unpack_rows

__all__ = ["ONNX_FILE", "export_onnx", "onnx_unsupported", "pack_matmul_nbits"]

ONNX_FILE = "model.onnx"
TABLE_BITS = (16, 8)  # the embedding and output matrix: fp16 where exact (16), or 8-bit codes
TABLE_BLOCK = 32  # values per scale and zero-point of an 8-bit table
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
        self.register_buffer("salient_weight_t", _narrowest(layer.salient_weight.cpu().t()))
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


def _narrowest(t: Tensor) -> Tensor:
    """``t`` as fp16 when every value is an fp16 value (then exact), else as fp32; contiguous."""
    t = t.detach()
    half = t.to(torch.float16)
    return (half if torch.equal(half.to(t.dtype), t) else t.float()).contiguous()


class TransposedTable(nn.Module):
    """A [vocab, hidden] matrix stored transposed, [hidden, vocab], in fp16 where exact."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("t", _narrowest(weight.t()))
        self.stored = str(self.t.dtype).removeprefix("torch.")

    def forward(self) -> Tensor:
        return self.t.float()


class TableEmbedding(nn.Module):
    """Token embedding read from a :class:`TransposedTable`: its columns for the ids."""

    def __init__(self, table: TransposedTable) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids: Tensor) -> Tensor:
        # the stored table's columns, widened after the gather: the output MatMul's widened
        # copy is then its alone (onnxruntime frees it once it has packed it for the MatMul)
        rows = torch.index_select(self.table.t, 1, input_ids.reshape(-1)).float()
        return rows.t().reshape(*input_ids.shape, rows.shape[0])


class TableHead(nn.Module):
    """Output Linear ``x @ W^T (+ bias)`` read from a :class:`TransposedTable`."""

    def __init__(self, table: nn.Module, bias: Tensor | None) -> None:
        super().__init__()
        self.table = table
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def product(self, x: Tensor) -> Tensor:
        return x @ self.table()

    def forward(self, x: Tensor) -> Tensor:
        y = self.product(x)
        return y if self.bias is None else y + self.bias


def quantize_table(weight: Tensor, block: int = TABLE_BLOCK) -> dict[str, Tensor]:
    """A [rows, cols] matrix as 8-bit codes per block of ``block`` columns: codes uint8 [rows,
    cols/block, block], scales fp32 and zero-points uint8 [rows * cols/block]: asymmetric round
    to nearest over [min(0, block min), max(0, block max)] (so 0 is a code; an all-zero block
    gets scale 1)."""
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // block, block)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = (hi - lo) / 255
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = (-lo / scale).round().clamp(0, 255)
    codes = (w / scale.unsqueeze(-1) + zero.unsqueeze(-1)).round().clamp(0, 255)
    return {
        "codes": codes.to(torch.uint8).contiguous(),
        "scales": scale.reshape(-1).contiguous(),
        "zero_points": zero.to(torch.uint8).reshape(-1).contiguous(),
    }


class QuantizedTable(nn.Module):
    """A [vocab, hidden] matrix as 8-bit block codes (:func:`quantize_table`)."""

    def __init__(self, weight: Tensor, block: int = TABLE_BLOCK) -> None:
        super().__init__()
        self.vocab, self.hidden = weight.shape
        self.block = block
        self.stored = (
            f"uint8 codes, blocks of {block}, output MatMul on int8 inputs; not exact "
            f"(onnxruntime >= 1.23)"
        )
        for name, t in quantize_table(weight, block).items():
            self.register_buffer(name, t)

    def forward(self) -> Tensor:
        """The dequantized matrix, fp32 [vocab, hidden] (the eager form)."""
        blocks = self.hidden // self.block
        zero = self.zero_points.float().reshape(self.vocab, blocks, 1)
        scale = self.scales.reshape(self.vocab, blocks, 1)
        return ((self.codes.float() - zero) * scale).reshape(self.vocab, self.hidden)


class QuantizedEmbedding(nn.Module):
    """Token embedding from a :class:`QuantizedTable` (``GatherBlockQuantized`` in ONNX)."""

    def __init__(self, table: QuantizedTable) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids: Tensor) -> Tensor:
        t = self.table
        if not torch.onnx.is_in_onnx_export():
            return torch.nn.functional.embedding(input_ids, t())
        blocks = t.hidden // t.block
        rows = torch.onnx.ops.symbolic(
            "com.microsoft::GatherBlockQuantized",
            (
                t.codes,
                input_ids,
                t.scales.reshape(t.vocab, blocks, 1),
                t.zero_points.reshape(t.vocab, blocks, 1),
            ),
            {"gather_axis": 0, "quantize_axis": 2, "block_size": t.block, "bits": 8},
            dtype=torch.float32,
            shape=(*input_ids.shape, blocks, t.block),
            version=1,
        )
        return rows.reshape(*input_ids.shape, t.hidden)


class QuantizedHead(TableHead):
    """Output Linear from a :class:`QuantizedTable` (an 8-bit ``MatMulNBits`` in ONNX)."""

    def product(self, x: Tensor) -> Tensor:
        t = self.table
        if not torch.onnx.is_in_onnx_export():
            return x @ t().t()
        return torch.onnx.ops.symbolic(
            "com.microsoft::MatMulNBits",
            (x, t.codes, t.scales, t.zero_points),
            {"K": t.hidden, "N": t.vocab, "bits": 8, "block_size": t.block, "accuracy_level": 4},
            dtype=x.dtype,
            shape=(*x.shape[:-1], t.vocab),
            version=1,
        )


def use_tables(model: nn.Module, bits: int = 16) -> dict:
    """Replace the token embedding and the output Linear (when they are a plain
    ``nn.Embedding`` and ``nn.Linear``) by modules reading one table each, one for a tied
    pair: :class:`TransposedTable` (``bits=16``) or :class:`QuantizedTable` (``bits=8``;
    the hidden size a multiple of ``TABLE_BLOCK``, else refused). Returns what was written,
    for the export report."""
    if bits not in TABLE_BITS:
        raise ValueError(f"table bits {bits}: use one of {TABLE_BITS}")
    set_cpu_head(model, enabled=False)  # the CPU inference head is a plain Linear again
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    # plain modules only (a subclass may scale, or be something else); a max_norm embedding
    # renormalizes its rows as it looks them up
    emb_ok = type(emb) is nn.Embedding and id(emb) in names and emb.max_norm is None
    head_ok = type(head) is nn.Linear and id(head) in names
    tied = emb_ok and head_ok and head.weight is emb.weight
    if head_ok and not emb_ok and head.weight is getattr(emb, "weight", None):
        head_ok = False  # tied to an embedding left as it is: a second table would not pay
    if bits == 16:
        make, embedding, output = TransposedTable, TableEmbedding, TableHead
    else:
        make, embedding, output = QuantizedTable, QuantizedEmbedding, QuantizedHead
        for ok, m in ((emb_ok, emb), (head_ok, head)):
            if ok and m.weight.shape[1] % TABLE_BLOCK:
                raise CheckpointError(
                    f"8-bit tables need a hidden size that is a multiple of {TABLE_BLOCK}, "
                    f"not {m.weight.shape[1]}; export with --table-bits 16"
                )
    done: dict = {}
    table = None
    if emb_ok:
        table = make(emb.weight)
        set_module(model, names[id(emb)], embedding(table))
        done["embedding"] = table.stored
    if head_ok:
        head_table = table if tied else make(head.weight)
        set_module(model, names[id(head)], output(head_table, head.bias))
        done["output"] = head_table.stored
        done["tied"] = tied
    return done


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
