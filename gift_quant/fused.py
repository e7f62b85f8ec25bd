"""Sibling linear layers that read the same input, run as one wider layer (inference only).

A decoder block calls its attention projections (q, k, v) on one tensor, and its MLP's gate and
up projections on another. Each call is a kernel launch whose time at decode (one or a few rows)
is mostly fixed cost; one launch over the concatenated outputs streams the same bytes in one
pass. :func:`fuse_siblings` finds such groups structurally, by one probe forward that records
which MixedLinear (or plain ``nn.Linear``) children of one parent receive the very same input
tensor, and replaces each group with one :class:`FusedLinear` whose members hand out their
column slices.

Plain Linears are concatenated as they are (so an fp16 model can be compared fused with
fused). The fused MixedLinear is exact: codes, scales, zero-points and biases are concatenated
along the output dimension, and its salient columns are the union of the members' (a member's
entries at another member's salient columns are zero, and its own quantized codes stay where
they are; a member's own salient columns hold the zero-point in the codes, so they dequantize
to zero).
Only layers with the same input width, bit width, group layout, device and dtypes are fused.
A fused model is for inference: export the model before fusing it (``save_quantized`` refuses
a fused one).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gift_quant.mixed_linear import MixedLinear
from gift_quant.quant.packing import pack_cols, unpack_cols

__all__ = ["FusedLinear", "FusedMember", "fuse_siblings", "is_fused"]


class FusedLinear(nn.Module):
    """One layer over the concatenated outputs of ``n`` members. A member's call computes
    the product for its input unless the last product was for the very same input tensor,
    unchanged since, and has not yet been handed to that member; each product is handed to each
    member once."""

    def __init__(self, fused: nn.Module, widths: list[int]) -> None:
        super().__init__()
        self.fused = fused
        self.bounds = [0]
        for w in widths:
            self.bounds.append(self.bounds[-1] + w)
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._version = -1  # of _x when _y was computed (an in-place change invalidates _y)
        self._left = 0  # bit i: member i has not yet taken its slice of _y

    def output(self, x: Tensor, i: int) -> Tensor:
        bit = 1 << i
        # inference tensors keep no version counter (nor can they change in place outside
        # inference mode)
        version = -2 if x.is_inference() else x._version
        if self._x is not x or not self._left & bit or self._version != version:
            self._x, self._y, self._version = x, self.fused(x), version
            self._left = (1 << (len(self.bounds) - 1)) - 1
        y = self._y
        self._left &= ~bit
        if not self._left:  # every member served: hold no activations
            self._x = self._y = None
        return y[..., self.bounds[i] : self.bounds[i + 1]]


class FusedMember(nn.Module):
    """Stands where member ``index`` of a fused group was; member 0 owns the group (so the
    tensors are registered once), the others refer to it."""

    def __init__(self, group: FusedLinear, index: int, source: nn.Module) -> None:
        super().__init__()
        if index == 0:
            self.group = group
        else:
            self.__dict__["group"] = group  # not a child: the tensors belong to member 0
        self.index = index
        self.in_features, self.out_features = source.in_features, source.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.group.output(x, self.index)

    def extra_repr(self) -> str:
        return f"member {self.index} of {len(self.group.bounds) - 1}, out={self.out_features}"


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, FusedMember) for m in model.modules())


def _compatible(a: nn.Module, b: nn.Module) -> bool:
    if type(a) is not type(b):
        return False
    if type(a) is nn.Linear:
        return (
            a.in_features == b.in_features
            and a.weight.dtype == b.weight.dtype
            and a.weight.device == b.weight.device
            and (a.bias is None) == (b.bias is None)
        )
    same = (
        a.in_features == b.in_features
        and a.bits == b.bits
        and a.group_size == b.group_size
        and a.backend == b.backend
        and a.qweight.device == b.qweight.device
        and (a.bias is None) == (b.bias is None)
        and (a.bias is None or a.bias.dtype == b.bias.dtype)
    )
    return same and bool(torch.equal(a.g_idx, b.g_idx))


def concat(layers: list[nn.Module]) -> nn.Module:
    """The layer whose output is the members' outputs side by side (module docstring)."""
    first = layers[0]
    if type(first) is nn.Linear:
        w = first.weight
        out = nn.Linear(
            first.in_features,
            sum(m.out_features for m in layers),
            bias=first.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(torch.cat([m.weight for m in layers]))
            if out.bias is not None:
                out.bias.copy_(torch.cat([m.bias for m in layers]))
        return out.requires_grad_(False)
    union = torch.unique(torch.cat([m.salient_idx for m in layers]))  # sorted
    N = sum(m.out_features for m in layers)
    fused = MixedLinear(
        first.in_features,
        N,
        bits=first.bits,
        group_size=first.group_size,
        num_salient=union.numel(),
        bias=first.bias is not None,
        sym=all(m.sym for m in layers),
        dtype=first.bias.dtype if first.bias is not None else torch.float16,
        device=first.qweight.device,
        backend=first.backend,
    )
    with torch.no_grad():
        fused.qweight.copy_(torch.cat([m.qweight for m in layers], dim=1))
        zeros = torch.cat([unpack_cols(m.qzeros, m.bits) for m in layers], dim=1)
        fused.qzeros.copy_(pack_cols(zeros, first.bits))
        fused.scales.copy_(torch.cat([m.scales for m in layers], dim=1))
        fused.g_idx.copy_(first.g_idx)
        fused.salient_idx.copy_(union)
        fused.salient_weight.zero_()
        row = 0
        for m in layers:
            if m.num_salient:
                pos = torch.searchsorted(union, m.salient_idx)
                rows = slice(row, row + m.out_features)
                fused.salient_weight[rows, pos] = m.salient_weight
            row += m.out_features
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in layers]))
    return fused


@torch.no_grad()
def fuse_siblings(
    model: nn.Module, probe: dict | None = None, linear: bool = False
) -> list[list[str]]:
    """Fuse every group of MixedLinear siblings (children of one module; ``linear``: plain
    ``nn.Linear`` siblings too) that one forward pass calls on the same input tensor; returns
    the groups fused, as lists of module names.

    ``probe``: the keyword arguments of that forward pass (default: one token of id 0 on the
    model's device, for a causal LM). Groups whose layers differ in input width, bits, groups,
    device, backend or bias are left alone."""
    kinds = (MixedLinear, nn.Linear) if linear else (MixedLinear,)
    names = {m: n for n, m in model.named_modules() if type(m) in kinds}
    if not names:
        return []
    calls: list[tuple[str, Tensor]] = []
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args: calls.append((names[mod], args[0])) if args else None
        )
        for m in names
    ]
    try:
        if probe is None:
            device = next(p.device for m in names for p in [*m.buffers(), *m.parameters()])
            probe = {"input_ids": torch.zeros(1, 1, dtype=torch.long, device=device)}
        model(**probe)
    finally:
        for h in hooks:
            h.remove()
    groups: list[tuple[str, Tensor, list[str]]] = []  # (parent, input, member names)
    for name, x in calls:
        parent = name.rpartition(".")[0]
        if groups and groups[-1][0] == parent and groups[-1][1] is x:
            if name not in groups[-1][2]:
                groups[-1][2].append(name)
        else:
            groups.append((parent, x, [name]))
    by_name = dict(model.named_modules())
    fused_groups = []
    for parent, _, members in groups:
        layers = [by_name[n] for n in members]
        if len(layers) < 2 or not all(_compatible(layers[0], m) for m in layers[1:]):
            continue
        group = FusedLinear(concat(layers), [m.out_features for m in layers])
        owner = by_name[parent] if parent else model
        for i, (n, layer) in enumerate(zip(members, layers, strict=True)):
            setattr(owner, n.rpartition(".")[2], FusedMember(group, i, layer))
        fused_groups.append(members)
    return fused_groups
