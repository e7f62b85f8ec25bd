"""The token embedding and output matrix of an ONNX export (``io/onnx.py``).

With ``bits=16`` they are written in fp16 where every value is an fp16 value (an export stores
its unquantized tensors in fp16), widened by a ``Cast`` that onnxruntime folds when it loads
the model, once, transposed ([hidden, vocab]): the output MatMul reads it as it is and the
embedding gathers its columns, so a tied pair is one table in the file. In memory onnxruntime
then keeps the fp16 table for the gather and one fp32 copy, packed, for the MatMul (with
[vocab, hidden] and a transposed copy for the MatMul it kept two fp32 copies).

``bits=8`` (opt-in, not exact) writes them instead as 8-bit codes per block of
``TABLE_BLOCK`` values along the hidden size, each block with its fp32 scale and 8-bit
zero-point (round to nearest over the block's range, widened to include 0): the embedding is
``com.microsoft::GatherBlockQuantized`` and the output Linear an 8-bit ``MatMulNBits``, a tied
pair reading the same codes (onnxruntime 1.23 or later runs 8-bit GatherBlockQuantized). The
output MatMul runs at accuracy level 4, its input rounded to int8 per block: onnxruntime has
no fast 8-bit kernel for fp32 inputs (on an AVX2 CPU the 49152 x 576 head took 147 ms a call
that way, 0.6 ms at level 4). About a quarter of the fp32 table's memory; the logits then
differ from the checkpoint's by both roundings, which the report's ``tables`` entry says.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gift_quant.io.checkpoint import CheckpointError
from gift_quant.kernels.cpu import set_cpu_head
from gift_quant.modeling import set_module

__all__ = ["TABLE_BITS", "TABLE_BLOCK", "narrowest", "quantize_table", "use_tables"]

TABLE_BLOCK = 32  # values per scale and zero-point of an 8-bit table


def narrowest(t: Tensor) -> Tensor:
    """``t`` as fp16 when every value is an fp16 value (then exact), else as fp32; contiguous."""
    t = t.detach()
    half = t.to(torch.float16)
    return (half if torch.equal(half.to(t.dtype), t) else t.float()).contiguous()


class TransposedTable(nn.Module):
    """A [vocab, hidden] matrix stored transposed, [hidden, vocab], in fp16 where exact."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("t", narrowest(weight.t()))
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


# table bits -> (table, embedding module, output module)
TABLE_KINDS = {
    16: (TransposedTable, TableEmbedding, TableHead),
    8: (QuantizedTable, QuantizedEmbedding, QuantizedHead),
}
TABLE_BITS = tuple(TABLE_KINDS)


def use_tables(model: nn.Module, bits: int = 16) -> dict:
    """Replace the token embedding and the output Linear (when they are a plain
    ``nn.Embedding`` and ``nn.Linear``) by modules reading one table each, one for a tied
    pair: :class:`TransposedTable` (``bits=16``) or :class:`QuantizedTable` (``bits=8``;
    the hidden size a multiple of ``TABLE_BLOCK``, else refused). Returns what was written,
    for the export report."""
    make, embedding, output = TABLE_KINDS[bits]
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
    if make is QuantizedTable:
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
