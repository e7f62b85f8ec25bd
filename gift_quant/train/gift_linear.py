"""``GiftLinear``: the training form of a Linear for GIFT-SW (docs/METHOD.md#5-gift-sw-training).

Only the salient columns train (fp32 master weights [N, k]). The rest stays frozen: either the
packed quantized base of a MixedLinear ("post" mode: codes, scales and zeros never change), or
a dense FP weight with the salient columns zeroed ("pre" mode). In training mode Gaussian (or
uniform) noise with per-row scale delta_i/2 is added to the frozen non-salient weights at every
forward pass; the noise is regenerated from its seed in backward, so it is never stored
(unless ``keep_weight``: the forward pass's training weight is kept for the backward pass).

    y = x @ (W_base + noise)^T + x[..., S] @ W_S^T + bias

Training runs one product per pass: the weight W^T [K, N] is rebuilt from the frozen base,
the noise (from its seed) and W_S in the compute dtype, and multiplied once; backward rebuilds
it for grad_x = grad_y @ W and takes grad_W_S = grad_y^T @ x[..., S]. On a GPU the rebuild is
one Triton launch (``kernels.triton.ops.noisy_weight_t``: packed codes in, noisy bf16 W^T out);
elsewhere its torch twin (``weight_t``) does the same in a few torch ops. The two draw
different random numbers from the same seed (Philox counters vs torch's generator), each
reproducibly.

In eval mode there is no noise and W_S is rounded to the export dtype (fp16), so the module
computes exactly what its export (:meth:`to_mixed`) computes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gift_quant.kernels import (
    Backend,
    base_matmul,
    cpu_native,
    release_inference_forms,
    triton_available,
)
from gift_quant.kernels.reference import dequantize_codes
from gift_quant.mixed_linear import MixedLinear
from gift_quant.noise import noise_step, sample_noise
from gift_quant.quant.base import contiguous_group
from gift_quant.quant.packing import unpack_cols, unpack_rows

__all__ = ["GiftLinear", "attach_gift", "detach_gift"]

EXPORT_DTYPE = torch.float16


class _GiftMatmul(torch.autograd.Function):
    """y = x @ W^T(seed, W_S) with W^T [K, N] = frozen base + noise, rows S = W_S^T. Gradients
    for x and W_S only; W^T is rebuilt in backward from the seed, never stored."""

    @staticmethod
    def forward(ctx, x: Tensor, ws: Tensor, layer: GiftLinear, seed: int | None) -> Tensor:
        xs = x[..., layer.salient_idx]
        ctx.layer, ctx.seed = layer, seed
        ctx.save_for_backward(xs, ws)
        wt = layer.weight_t(x.dtype, seed, ws, x.device)
        # kept for grad_x if asked (else rebuilt there: the same seed gives the same W^T)
        ctx.wt = wt if layer.keep_weight and ctx.needs_input_grad[0] else None
        return x @ wt

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        xs, ws = ctx.saved_tensors
        wt, ctx.wt = ctx.wt, None
        grad_x = grad_ws = None
        if ctx.needs_input_grad[0]:
            if wt is None:
                wt = ctx.layer.weight_t(grad_y.dtype, ctx.seed, ws, grad_y.device)
            grad_x = grad_y @ wt.t()
        if ctx.needs_input_grad[1]:
            g2 = grad_y.reshape(-1, grad_y.shape[-1])
            grad_ws = (g2.t() @ xs.reshape(-1, xs.shape[-1]).to(g2.dtype)).to(ws.dtype)
        return grad_x, grad_ws, None, None


class GiftLinear(nn.Module):
    """Frozen base + noise + trainable salient columns. Build with :meth:`from_mixed` (post)
    or :meth:`from_dense` (pre)."""

    def __init__(
        self,
        base: MixedLinear | Tensor,
        salient_idx: Tensor,
        salient_weight: Tensor,
        bias: Tensor | None,
        *,
        noise: str = "normal",
        delta: Tensor | None = None,
        backend: Backend | str = Backend.AUTO,
    ) -> None:
        super().__init__()
        if isinstance(base, MixedLinear):
            self.base = base
            self.register_buffer("base_weight", None)
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            self.base = None
            w = base.detach().clone()
            w[:, salient_idx.long()] = 0
            self.register_buffer("base_weight", w)
            self.out_features, self.in_features = w.shape
        self.register_buffer("salient_idx", salient_idx.to(torch.int32).clone())
        self.salient_weight = nn.Parameter(salient_weight.detach().float().clone())
        frozen_bias = None if bias is None else bias.detach().clone()
        self.bias = None if bias is None else nn.Parameter(frozen_bias, requires_grad=False)
        if noise != "none" and delta is None:
            raise ValueError("noise needs the per-row step delta")
        self.noise = noise
        self.register_buffer("delta", None if delta is None else delta.float().clone())
        keep = torch.ones(self.in_features, dtype=torch.bool, device=salient_idx.device)
        keep[salient_idx.long()] = False
        self.register_buffer("keep", keep, persistent=False)
        self.backend = Backend(backend)
        self.noise_seed = 0  # set by the trainer before every forward pass
        # keep the forward pass's W^T for the backward pass instead of rebuilding it (the
        # trainer's choice: on the CPU, where the rebuild's random numbers cost, if it fits)
        self.keep_weight = False
        # the base unpacked once for the CPU rebuilds (lazy): codes, zeros, contiguous group size
        self._codes = self._zeros = self._group = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_mixed(cls, layer: MixedLinear, noise: str, bits: int) -> GiftLinear:
        """Post mode: train the salient columns of a quantized layer; delta from the
        ``bits``-bit grid of its dequantized non-salient weights."""
        delta = None
        if noise != "none":
            delta = noise_step(layer.dequantize(torch.float32), layer.salient_idx, bits)
        release_inference_forms(layer)  # an evaluation's cached forms: not used in training
        return cls(
            layer,
            layer.salient_idx,
            layer.salient_weight.float(),
            layer.bias,
            noise=noise,
            delta=delta,
            backend=layer.backend,
        )

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, salient_idx: Tensor, noise: str, bits: int
    ) -> GiftLinear:
        """Pre mode: train the salient columns of an FP layer; delta from the ``bits``-bit grid
        (the bit width it will be quantized to) of its non-salient weights."""
        W = linear.weight.detach()
        delta = noise_step(W, salient_idx, bits) if noise != "none" else None
        return cls(
            W, salient_idx, W.float()[:, salient_idx.long()], linear.bias, noise=noise, delta=delta
        )

    def to_mixed(self) -> MixedLinear:
        """The trained post-mode layer: the same packed base, salient columns rounded to fp16."""
        if self.base is None:
            raise TypeError("a pre-mode GiftLinear has a dense base; use to_linear()")
        self.base.salient_weight = self.salient_weight.detach().to(EXPORT_DTYPE)
        return self.base

    def to_linear(self) -> nn.Linear:
        """The trained pre-mode layer as a plain Linear (salient columns in place)."""
        if self.base_weight is None:
            raise TypeError("a post-mode GiftLinear has a packed base; use to_mixed()")
        w = self.base_weight.clone()
        w[:, self.salient_idx.long()] = self.salient_weight.detach().to(w.dtype)
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        lin.weight.data = w
        if self.bias is not None:
            lin.bias.data = self.bias.to(w.dtype)
        return lin

    # ------------------------------------------------------------------ forward

    def weight_t(
        self,
        dtype: torch.dtype,
        seed: int | None,
        salient_weight: Tensor | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        """The training weight as W^T [K, N] in ``dtype``: the frozen base, plus noise drawn
        from ``seed`` on the non-salient rows (none if ``seed`` is None), with rows S set to
        ``salient_weight``^T (zeros if None)."""
        noise = self.noise if seed is not None else "none"
        ws = self.salient_weight.detach() if salient_weight is None else salient_weight.detach()
        if salient_weight is None:
            ws = torch.zeros_like(ws)
        if self.base is not None and self._triton(device or self.base.qweight.device):
            from gift_quant.kernels.triton import ops as triton_ops

            wt = triton_ops.noisy_weight_t(self.base, ws.t(), noise, self.delta, seed or 0, dtype)
            if wt is not None:
                return wt
        if self.base is not None and self._native(device or self.base.qweight.device):
            wt = self._weight_t_native(dtype, noise, seed, ws)
            if wt is not None:
                return wt
        return self._weight_t_torch(dtype, noise, seed, ws)

    def _triton(self, device: torch.device) -> bool:
        wants = self.backend in (Backend.AUTO, Backend.TRITON)
        return device.type == "cuda" and wants and triton_available()

    def _native(self, device: torch.device) -> bool:
        return device.type == "cpu" and self.backend in (
            Backend.AUTO,
            Backend.CPU,
            Backend.CPU_PACKED,
        )

    def _unpacked(self) -> tuple[Tensor, Tensor, int | None]:
        """The base's codes [K, N] uint8, zeros [G, N] and contiguous group size (None for
        act-order), found once (frozen; integers, not a float copy)."""
        b = self.base
        if self._codes is None or self._codes.device != b.qweight.device:
            self._codes = unpack_rows(b.qweight, b.bits).to(torch.uint8)
            self._zeros = unpack_cols(b.qzeros, b.bits)
            self._group = contiguous_group(b)
        return self._codes, self._zeros, self._group

    def _weight_t_native(self, dtype, noise: str, seed: int | None, ws: Tensor) -> Tensor | None:
        """The CPU kernel's rebuild in one pass (fp32 or bf16, contiguous groups), its noise
        drawn as the GPU kernel draws it; None where it does not serve the layer."""
        codes, zeros, group = self._unpacked()
        if group is None:
            return None
        wt = cpu_native.noisy_weight_t(
            codes, zeros, self.base.scales, group, self.delta, noise, seed or 0, dtype
        )
        if wt is None:
            return None
        return wt.index_copy_(0, self.salient_idx.long(), ws.t().to(dtype))

    def _weight_t_torch(self, dtype, noise: str, seed: int | None, ws: Tensor) -> Tensor:
        """The torch twin of the Triton and CPU rebuilds (fp64, layouts the kernels skip)."""
        if self.base is not None:
            b = self.base
            codes, zeros, _ = self._unpacked()
            wt = dequantize_codes(codes, zeros, b.scales, b.g_idx, dtype)
        else:
            wt = self.base_weight.to(dtype).t().contiguous()
        if noise != "none":
            shape = (self.in_features, self.out_features)
            wt.add_(sample_noise(shape, self.delta[None, :], noise, seed, wt.device, dtype))
        return wt.index_copy_(0, self.salient_idx.long(), ws.t().to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:  # one product: frozen base + noise + trainable columns
            seed = self.noise_seed if self.noise != "none" else None
            y = _GiftMatmul.apply(x, self.salient_weight, self, seed)
        else:  # exactly what the export computes: MixedLinear's product, W_S in fp16
            if self.base is None:
                y = x @ self.base_weight.to(x.dtype).t()
            else:
                y = base_matmul(x, self.base, self.backend)
            if self.salient_idx.numel():
                w_s = self.salient_weight.to(EXPORT_DTYPE).to(x.dtype)
                y = y + x[..., self.salient_idx] @ w_s.t()
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        kind = "packed" if self.base is not None else "dense"
        return (
            f"in={self.in_features}, out={self.out_features}, base={kind}, "
            f"salient={self.salient_idx.numel()}, noise={self.noise}"
        )


def attach_gift(model: nn.Module, noise: str, bits: int, salient: dict[str, Tensor] | None = None):
    """Swap the model's trainable layers for GiftLinear and freeze everything else.

    Post mode (``salient`` None): every MixedLinear. Pre mode: every nn.Linear named in
    ``salient`` (name -> salient column indices). Returns {name: GiftLinear}.
    """
    from gift_quant.modeling import set_module

    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name, module in list(model.named_modules()):
        if salient is None and isinstance(module, MixedLinear):
            layers[name] = GiftLinear.from_mixed(module, noise, bits)
        elif salient is not None and name in salient:
            layers[name] = GiftLinear.from_dense(
                module, salient[name].to(module.weight.device), noise, bits
            )
    if not layers:
        raise ValueError(
            "no layer to train: quantize the model first (post mode) or give salient columns"
        )
    for name, layer in layers.items():
        set_module(model, name, layer)
    return layers


def detach_gift(model: nn.Module) -> None:
    """Swap every GiftLinear back: MixedLinear (post) or nn.Linear (pre), trained columns in."""
    from gift_quant.modeling import set_module

    for name, module in list(model.named_modules()):
        if isinstance(module, GiftLinear):
            set_module(
                model, name, module.to_mixed() if module.base is not None else module.to_linear()
            )
