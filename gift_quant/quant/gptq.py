"""GPTQ (Frantar et al., 2022, Alg. 1) over the non-salient columns, salient columns last.

Salient columns are permuted to the end of the processing order, so every quantized column's
error is partly compensated into them (as in OWQ and QUIK); they are returned with their compensated
values (docs/METHOD.md#4-quantizers). Scales and zeros are fitted on non-salient columns only.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from gift_quant.quant.base import QuantizedWeight, check_shape
from gift_quant.quant.grid import Grid, fit_params

log = logging.getLogger(__name__)


def column_order(diag: Tensor, is_salient: Tensor, group: int, order: str) -> Tensor:
    """Processing order of the non-salient columns: [K - k] int64 column indices.

    natural: index order. act: descending diag(H). gar: groups by the max diag(H) of their
    non-salient columns, columns inside a group by descending diag(H) (group-aware reordering,
    Gafni et al. 2025, as gptqmodel's default) -- groups stay contiguous, g_idx stays trivial.
    """
    K = diag.numel()
    cols = torch.arange(K, device=diag.device)
    keep = ~is_salient
    if order == "natural":
        return cols[keep]
    if order == "act":
        idx = cols[keep]
        return idx[torch.argsort(diag[keep], descending=True, stable=True)]
    if order == "gar":
        G = K // group
        d = torch.where(keep, diag, torch.full_like(diag, -1.0)).reshape(G, group)
        inner = torch.argsort(d, dim=1, descending=True, stable=True)  # [G, g]
        group_rank = torch.argsort(d.amax(1), descending=True, stable=True)
        full = (inner + torch.arange(G, device=diag.device).unsqueeze(1) * group)[group_rank]
        full = full.reshape(-1)
        return full[keep[full]]
    raise ValueError(f"unknown GPTQ column order {order!r}; use natural, act or gar")


def inverse_hessian_cholesky(H: Tensor, damp_frac: float) -> Tensor:
    """Upper Cholesky factor of (H + damp I)^-1; raises the damping until H is positive definite."""
    damp = damp_frac * torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                if attempt:
                    log.warning("GPTQ: Hessian needed %.3g x the dampening", 10.0**attempt)
                return U
        damp = damp * 10
    raise RuntimeError("GPTQ: the Hessian is not positive definite even with 1e5 x dampening")


@torch.no_grad()
def gptq(weight: Tensor, hessian: Tensor | None, salient_idx: Tensor, cfg) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` [N, K] given ``hessian`` [K, K] (sum of x x^T, fp32).

    ``cfg`` is a QuantConfig: bits, group_size, sym, clip search, damp_frac, block_size,
    order (natural | act | gar) and static_groups.
    """
    if hessian is None:
        raise ValueError("quant.method=gptq needs the layer's Hessian; run calibration first")
    N, K = weight.shape
    check_shape(K, N, cfg.group_size)
    grid = Grid.from_config(cfg)
    group = K if cfg.group_size == -1 else cfg.group_size
    G = K // group
    dev = weight.device
    order = cfg.resolved_order

    W = weight.float().clone()
    H = hessian.float().clone()
    salient = torch.sort(salient_idx.to(dev).long()).values
    is_salient = torch.zeros(K, dtype=torch.bool, device=dev)
    is_salient[salient] = True
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead & ~is_salient] = 0

    perm = torch.cat([column_order(torch.diag(H), is_salient, group, order), salient])
    n_q = K - salient.numel()
    arange = torch.arange(K, device=dev)
    # Group of each processing position: act-order without static groups forms groups in
    # processing order (GPTQ desc_act); every other mode keeps the original contiguous groups.
    lazy_act = order == "act" and not cfg.static_groups
    gid = arange // group if lazy_act else perm // group
    g_idx = torch.empty(K, dtype=torch.int32, device=dev)
    g_idx[perm] = gid.to(torch.int32)

    scales = torch.ones(N, G, device=dev)
    zeros = torch.full((N, G), float((grid.maxq + 1) // 2), device=dev)
    if cfg.static_groups:
        mask = ~is_salient.reshape(G, group)
        scales, zeros = fit_params(W.reshape(N, G, group), grid, mask)
    else:  # each group's members are contiguous in processing order: find where they end
        counts = torch.bincount(gid[:n_q], minlength=G)
        group_end = {}
        p = 0
        while p < n_q:
            group_end[p] = p + int(counts[gid[p]])
            if not bool((gid[p : group_end[p]] == gid[p]).all()):
                raise AssertionError("GPTQ group members are not contiguous in processing order")
            p = group_end[p]

    W = W[:, perm]
    H = H[perm][:, perm]
    Hinv = inverse_hessian_cholesky(H, cfg.damp_frac)
    del H
    codes = torch.empty(N, K, device=dev)
    row_loss = torch.zeros(N, device=dev)
    gid_list = gid.tolist()

    for i1 in range(0, n_q, cfg.block_size):  # Alg. 1: lazy batch updates of width B
        i2 = min(i1 + cfg.block_size, n_q)
        W1 = W[:, i1:i2].clone()
        Q1 = codes[:, i1:i2]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        k_cur = -1
        for i in range(i2 - i1):
            p = i1 + i
            k = gid_list[p]
            if not cfg.static_groups and p in group_end:
                # Fit on the group's current values, including updates still pending from
                # this block for the members beyond it.
                b = group_end[p]
                cur = W1[:, i : min(b, i2) - i1]
                if b > i2:
                    ahead = W[:, i2:b] - Err1[:, :i] @ Hinv[i1:p, i2:b]
                    cur = torch.cat([cur, ahead], dim=1)
                s_, z_ = fit_params(cur.unsqueeze(1), grid)
                scales[:, k], zeros[:, k] = s_[:, 0], z_[:, 0]
                k_cur = -1
            if k != k_cur:
                s, z, k_cur = scales[:, k], zeros[:, k], k
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s).add_(z), 0, grid.maxq)
            Q1[:, i] = q
            err = w.sub(q.sub_(z).mul_(s)).div_(Hinv1[i, i])
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        row_loss += Err1.square().sum(1) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    # Salient columns: zero-point codes, compensated values.
    codes[:, n_q:] = zeros[:, gid[n_q:]]
    out_codes = torch.empty_like(codes)
    out_codes[:, perm] = codes
    return QuantizedWeight(
        codes=out_codes.to(torch.int32),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        salient_idx=salient,
        salient_weight=W[:, n_q:].clone(),
        bits=cfg.bits,
        group_size=cfg.group_size,
        sym=cfg.sym,
        loss=float(row_loss.sum()),
        row_loss=row_loss,
    )
