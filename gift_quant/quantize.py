"""The quantize stage: calibrate block by block, rank salient columns, quantize, swap modules.

``quantize_model`` replaces every target Linear by a :class:`~gift_quant.mixed_linear.MixedLinear`
(GPTQ tensors + FP16 salient columns). The inputs of block i are the outputs of the already
quantized blocks before it (GPTQ's sequential scheme); with ``calib.true_sequential`` the same
holds inside a block, group by group (q/k/v, then o, then gate/up, then down).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from gift_quant.calibration import (
    LayerStats,
    capture_block_inputs,
    collect_stats,
    forward_block,
    plan_groups,
)
from gift_quant.data import calibration_set
from gift_quant.mixed_linear import MixedLinear
from gift_quant.modeling import (
    cast_params,
    check_context,
    decoder_blocks,
    find_targets,
    resolve_device,
    resolve_dtype,
    set_module,
)
from gift_quant.quant import QUANTIZERS, check_shape
from gift_quant.quant.grid import Grid
from gift_quant.saliency import column_scores, salient_budget, select_salient

log = logging.getLogger(__name__)

__all__ = [
    "LayerReport",
    "QuantizeReport",
    "quantize_linear",
    "quantize_model",
    "quantize_targets",
    "salient_plan",
    "select_salient_columns",
]


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    num_salient: int
    storage_bits: int
    gptq_loss: float  # GPTQ's proxy loss (0 for RTN)
    rel_error: float | None  # ||X(W - W_q)^T||^2 / ||X W^T||^2 from the Hessian (None without one)
    seconds: float


@dataclass
class QuantizeReport:
    layers: list[LayerReport] = field(default_factory=list)
    calib_tokens: int = 0
    seconds_calibration: float = 0.0
    seconds_total: float = 0.0

    @property
    def bits_per_weight(self) -> float:
        """Average stored bits per weight of the target Linears (scales, zeros, salient incl.)."""
        weights = sum(r.in_features * r.out_features for r in self.layers)
        return sum(r.storage_bits for r in self.layers) / max(weights, 1)

    def to_dict(self) -> dict:
        return {
            "bits_per_weight": self.bits_per_weight,
            "num_layers": len(self.layers),
            "num_salient_total": sum(r.num_salient for r in self.layers),
            "calib_tokens": self.calib_tokens,
            "seconds_calibration": self.seconds_calibration,
            "seconds_total": self.seconds_total,
            "layers": [asdict(r) for r in self.layers],
        }


def salient_plan(per_block: list[dict[str, nn.Linear]], saliency, quant) -> dict[str, int]:
    """The salient plan: name -> number of salient columns of every target, computed once.

    Raises ValueError (naming the layer) when a budget does not fit, before any heavy work."""
    return {
        name: salient_budget(name, lin.in_features, lin.out_features, saliency, quant)
        for targets in per_block
        for name, lin in targets.items()
    }


def _salient_columns(name, W, stats, k, saliency, quant) -> torch.Tensor:
    """Sorted salient column indices of one Linear: the metric's top ``k``."""
    if not k:
        return torch.zeros(0, dtype=torch.int64, device=W.device)
    if stats is None:
        raise ValueError(f"{name}: ranking salient columns needs calibration statistics")
    grid = Grid.from_config(quant)
    return select_salient(column_scores(W, stats, saliency.norms, grid, quant.group_size), k)


def _finish(name, linear, qw, hessian, seconds) -> tuple[MixedLinear, LayerReport]:
    """The MixedLinear of a quantized weight (on the CPU) and its report line."""
    W = linear.weight.detach().to(qw.codes.device).float()
    rel_error = None
    if hessian is not None:
        D = W - qw.dequantize()
        rel_error = float((D @ hessian * D).sum() / (W @ hessian * W).sum().clamp(min=1e-30))
    bias = linear.bias.detach().cpu() if linear.bias is not None else None
    qw_cpu = dataclasses.replace(
        qw, **{k: v.cpu() for k, v in vars(qw).items() if torch.is_tensor(v)}
    )
    layer = MixedLinear.from_quantized(qw_cpu, bias, dtype=linear.weight.dtype)
    N, K = W.shape
    report = LayerReport(
        name=name,
        in_features=K,
        out_features=N,
        num_salient=qw.salient_idx.numel(),
        storage_bits=layer.storage_bits(),
        gptq_loss=qw.loss,
        rel_error=rel_error,
        seconds=seconds,
    )
    return layer, report


@torch.no_grad()
def quantize_linear(
    name: str,
    linear: nn.Linear,
    stats: LayerStats | None,
    salient_idx: torch.Tensor,
    quant,
    device: torch.device,
) -> tuple[MixedLinear, LayerReport]:
    """Quantize one Linear (weights read in their storage dtype) with the QuantConfig ``quant``,
    keeping the columns ``salient_idx`` in FP16, into a MixedLinear on the CPU."""
    t0 = time.perf_counter()
    W = linear.weight.detach().to(device)
    idx = torch.sort(salient_idx.to(device).long()).values
    hessian = stats.hessian if stats is not None else None
    qw = QUANTIZERS.get(quant.method)(W, hessian, idx, quant)
    return _finish(name, linear, qw, hessian, time.perf_counter() - t0)


@torch.no_grad()
def quantize_shared(
    names: list[str], linears: list[nn.Linear], stats: LayerStats, quant, device: torch.device
) -> list[tuple[MixedLinear, LayerReport]]:
    """GPTQ of Linears that read the same input (q/k/v, gate/up) and keep no salient columns:
    their rows are stacked and quantized in one pass over the shared Hessian. Each output row
    is quantized independently in GPTQ, so this equals quantizing them one by one."""
    t0 = time.perf_counter()
    W = torch.cat([lin.weight.detach().to(device) for lin in linears])
    none = torch.zeros(0, dtype=torch.int64, device=device)
    qw = QUANTIZERS.get("gptq")(W, stats.hessian, none, quant)
    seconds = (time.perf_counter() - t0) / len(names)
    out, start = [], 0
    for name, lin in zip(names, linears, strict=True):
        end = start + lin.out_features
        out.append(_finish(name, lin, qw.rows(start, end), stats.hessian, seconds))
        start = end
    return out


def _shared_batches(group, stats, plan, quant, forced) -> list[list[str]]:
    """Split a group into runs of Linears that can share one GPTQ pass (see quantize_shared):
    consecutive, same statistics object (same input), no salient columns in the plan."""
    if quant.method != "gptq" or forced is not None:
        return [[n] for n in group]
    runs: list[tuple[list[str], bool]] = []
    for name in group:
        plain = plan[name] == 0
        if plain and runs and runs[-1][1] and stats.get(runs[-1][0][0]) is stats.get(name):
            runs[-1][0].append(name)
        else:
            runs.append(([name], plain))
    return [names for names, _ in runs]


def _dense(layer: MixedLinear, device: torch.device, dtype: torch.dtype) -> nn.Linear:
    """A plain Linear computing what ``layer`` computes (up to summation order); calibration
    passes use it to avoid unpacking the codes on every call."""
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    dense.weight.data = layer.dequantize(torch.float32).to(device=device, dtype=dtype)
    if layer.bias is not None:
        dense.bias.data = layer.bias.to(device=device, dtype=dtype)
    return dense


def check_targets(
    model: nn.Module, targets_cfg, saliency, quant
) -> tuple[str, nn.ModuleList, list[dict[str, nn.Linear]], dict[str, int]]:
    """Find every target (``targets_cfg``: a ModelConfig's include/exclude), check its shape
    and make the salient plan before any heavy work starts."""
    blocks_name, blocks = decoder_blocks(model)
    per_block = [
        find_targets(block, f"{blocks_name}.{i}", targets_cfg.include, targets_cfg.exclude)
        for i, block in enumerate(blocks)
    ]
    if not any(per_block):
        raise ValueError(
            f"no target Linears matched model.include={list(targets_cfg.include)} "
            f"model.exclude={list(targets_cfg.exclude)} inside {blocks_name}"
        )
    for targets in per_block:
        for name, linear in targets.items():
            check_shape(linear.in_features, linear.out_features, quant.group_size, name)
    return blocks_name, blocks, per_block, salient_plan(per_block, saliency, quant)


def _last_target_block(per_block: list[dict[str, nn.Linear]]) -> int:
    """Index of the last decoder block holding a target (-1 when none does)."""
    return max((i for i, targets in enumerate(per_block) if targets), default=-1)


def _calibration_inputs(model, tokenizer, calib, blocks, device, dtype):
    check_context(model, calib.seq_len, "calib.seq_len")
    log.info(
        "calibration: %d windows x %d tokens from %s",
        calib.num_samples,
        calib.seq_len,
        calib.source,
    )
    windows = calibration_set(tokenizer, calib)
    return capture_block_inputs(model, blocks, list(windows.split(calib.batch_size)), device, dtype)


def quantize_model(
    model: nn.Module,
    tokenizer,
    recipe,
    progress: bool = True,
    salient: dict[str, torch.Tensor] | None = None,
) -> QuantizeReport:
    """Quantize ``model`` in place (its target Linears become MixedLinear) and report.

    Reads the recipe's model (targets, device), calib, saliency and quant sections; see
    :func:`quantize_targets`. ``salient`` (name -> column indices) replaces the saliency ranking
    for those layers."""
    return quantize_targets(
        model,
        tokenizer,
        targets=recipe.model,
        calib=recipe.calib,
        saliency=recipe.saliency,
        quant=recipe.quant,
        progress=progress,
        salient=salient,
    )


def quantize_targets(
    model: nn.Module,
    tokenizer,
    *,
    targets,
    calib,
    saliency,
    quant,
    progress: bool = True,
    salient: dict[str, torch.Tensor] | None = None,
) -> QuantizeReport:
    """The quantize stage on its own config sections: ``targets`` (a ModelConfig: include,
    exclude, device), ``calib``, ``saliency`` and ``quant``."""
    t_start = time.perf_counter()
    device = resolve_device(targets.device)
    dtype = resolve_dtype(calib.dtype, device)
    blocks_name, blocks, per_block, plan = check_targets(model, targets, saliency, quant)
    needs_hessian = quant.method == "gptq"
    ranked = [n for n, k in plan.items() if k and (salient is None or n not in salient)]
    needs_calib = needs_hessian or bool(ranked)
    # activation norms the saliency metric reads; none when no layer ranks salient columns
    norms = (saliency.norms[1],) if ranked else ()
    report = QuantizeReport()
    inputs: list = []
    kwargs: list = []
    if needs_calib:
        inputs, kwargs = _calibration_inputs(model, tokenizer, calib, blocks, device, dtype)
        report.calib_tokens = sum(x.shape[0] * x.shape[1] for x in inputs)
    # blocks past the last one with targets change nothing: they are not run
    end = _last_target_block(per_block) + 1
    bar = tqdm(range(end), desc=f"{quant.method} w{quant.bits}", disable=not progress)
    for i in bar:
        block, block_targets = blocks[i], per_block[i]
        prefix = f"{blocks_name}.{i}."
        block_kwargs = [kw[i] for kw in kwargs]
        work = cast_params(copy.deepcopy(block).to(device), dtype) if needs_calib else None
        work_targets = (
            {n: work.get_submodule(n[len(prefix) :]) for n in block_targets} if work else {}
        )
        if not block_targets:  # only run, to feed the next block
            groups = []
        elif needs_calib and calib.true_sequential:
            groups = plan_groups(work, work_targets, inputs[0], block_kwargs[0])
        else:
            groups = [list(block_targets)]
        for group in groups:
            t0 = time.perf_counter()
            stats: dict[str, LayerStats] = {}
            if needs_calib:
                stats = collect_stats(
                    work,
                    {n: work_targets[n] for n in group},
                    inputs,
                    block_kwargs,
                    with_hessian=needs_hessian,
                    stop_after=group[-1] if len(groups) > 1 else None,
                    norms=norms,
                )
            report.seconds_calibration += time.perf_counter() - t0
            for batch in _shared_batches(group, stats, plan, quant, salient):
                linears = [block_targets[n] for n in batch]
                if len(batch) > 1:
                    done = quantize_shared(batch, linears, stats[batch[0]], quant, device)
                else:
                    name, linear = batch[0], linears[0]
                    idx = None if salient is None else salient.get(name)
                    if idx is None:
                        W = linear.weight.detach().to(device)
                        idx = _salient_columns(
                            name, W, stats.get(name), plan[name], saliency, quant
                        )
                    done = [quantize_linear(name, linear, stats.get(name), idx, quant, device)]
                for name, (layer, layer_report) in zip(batch, done, strict=True):
                    set_module(block, name[len(prefix) :], layer)
                    if work is not None:  # later passes see the quantized layer (dense copy)
                        set_module(work, name[len(prefix) :], _dense(layer, device, dtype))
                    report.layers.append(layer_report)
            del stats
        if work is not None and i + 1 < end:  # the next block's inputs
            t0 = time.perf_counter()
            inputs = forward_block(work, inputs, block_kwargs)
            report.seconds_calibration += time.perf_counter() - t0
        del work
        done_layers = report.layers[-len(block_targets) :] if block_targets else []
        errs = [r.rel_error for r in done_layers if r.rel_error is not None]
        if errs:
            bar.set_postfix(rel_err=f"{sum(errs) / len(errs):.2e}")
    report.seconds_total = time.perf_counter() - t_start
    return report


@torch.no_grad()
def select_salient_columns(
    model: nn.Module, tokenizer, recipe, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Salient columns of every target of the unquantized model (what pre mode trains).

    The same metric and salient plan as quantization, with statistics from the FP model's own
    activations (nothing is quantized, so blocks feed their FP outputs forward). Reads the
    recipe's model, calib, saliency and quant sections."""
    targets, calib, saliency, quant = recipe.model, recipe.calib, recipe.saliency, recipe.quant
    device = resolve_device(targets.device)
    dtype = resolve_dtype(calib.dtype, device)
    blocks_name, blocks, per_block, plan = check_targets(model, targets, saliency, quant)
    inputs, kwargs = _calibration_inputs(model, tokenizer, calib, blocks, device, dtype)
    chosen: dict[str, torch.Tensor] = {}
    end = _last_target_block(per_block) + 1
    for i in tqdm(range(end), desc="select salient", disable=not progress):
        prefix = f"{blocks_name}.{i}."
        block_kwargs = [kw[i] for kw in kwargs]
        work = cast_params(copy.deepcopy(blocks[i]).to(device), dtype)
        work_targets = {n: work.get_submodule(n[len(prefix) :]) for n in per_block[i]}
        stats = {}
        if work_targets:
            norms = (saliency.norms[1],)
            stats = collect_stats(
                work, work_targets, inputs, block_kwargs, with_hessian=False, norms=norms
            )
        for name, linear in per_block[i].items():
            W = linear.weight.detach().to(device)
            chosen[name] = _salient_columns(name, W, stats[name], plan[name], saliency, quant).cpu()
        if i + 1 < end:
            inputs = forward_block(work, inputs, block_kwargs)
    return chosen
