"""Independent oracles: the quantizer and the training loss checked against code written here,
not against the package's own helpers.

- GPTQ (natural order, no clipping) against a plain, unblocked transcription of Algorithm 1
  of Frantar et al. (2022), in float64;
- the lazy-batch width ``block_size`` leaves the codes alone;
- the two-level clip search against the exhaustive search over every shrink step;
- the training loss: token-weighted across micro-batches, and falling on a tiny model.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gift_quant.quant import QUANTIZERS
from gift_quant.quant.grid import Grid, fit_params
from gift_quant.recipe import QuantConfig

# ------------------------------------------------------------------------------------------
# GPTQ


def _problem(seed: int, N: int = 64, K: int = 128, samples: int = 512):
    """Weights with a few outlier columns and a Hessian X^T X of correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    W[:, torch.randperm(K, generator=g)[:4]] *= 6
    mix = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K)
    X = torch.randn(samples, K, generator=g) @ mix
    return W, X.t() @ X


def _fit(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid of GPTQ's quantizer (no clipping) for the rows of ``w`` [N, n]: the range
    always holds 0, the scale is stored in fp16, a symmetric zero sits at 2**(bits-1)."""
    maxq = 2**bits - 1
    lo = w.min(1).values.clamp(max=0)
    hi = w.max(1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    flat = hi == lo
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scale = ((hi - lo) / maxq).half().double()
    zero = torch.full_like(scale, 2.0 ** (bits - 1)) if sym else torch.round(-lo / scale)
    return scale, zero.clamp(0, maxq)


def algorithm_1(W, H, salient, bits, group, sym, damp_frac=0.01):
    """GPTQ, one column at a time (no lazy batches), non-salient columns in index order then
    the salient ones, which are not quantized but absorb the error; each group's grid is fit
    on its non-salient columns as they stand when the first of them is reached.

    Returns (codes [N, K] with the zero-point at salient columns, salient columns after error
    feedback [N, k], scales [N, G], zeros [N, G])."""
    N, K = W.shape
    maxq = 2**bits - 1
    W, H = W.double().clone(), H.double().clone()
    keep = [c for c in range(K) if c not in set(salient)]
    order = keep + sorted(salient)
    W, H = W[:, order], H[order][:, order]
    H += damp_frac * H.diagonal().mean() * torch.eye(K, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    G = K // group
    scales = torch.ones(N, G, dtype=torch.float64)
    zeros = torch.full((N, G), float((maxq + 1) // 2), dtype=torch.float64)
    codes = torch.zeros(N, K, dtype=torch.float64)
    fitted = set()
    for j in range(len(keep)):
        g = keep[j] // group
        if g not in fitted:
            members = [p for p in range(len(keep)) if keep[p] // group == g]
            scales[:, g], zeros[:, g] = _fit(W[:, members], bits, sym)
            fitted.add(g)
        s, z = scales[:, g], zeros[:, g]
        q = torch.clamp(torch.round(W[:, j] / s) + z, 0, maxq)
        codes[:, j] = q
        err = (W[:, j] - s * (q - z)) / U[j, j]
        W[:, j:] -= torch.outer(err, U[j, j:])
    out = torch.empty_like(codes)
    out[:, order] = codes
    for c in salient:
        out[:, c] = zeros[:, c // group]
    return out, W[:, len(keep) :], scales, zeros


def _gptq(W, H, salient, **cfg):
    cfg = QuantConfig(method="gptq", mse_clip=False, **cfg)
    return QUANTIZERS.get("gptq")(W, H, torch.tensor(salient, dtype=torch.long), cfg)


@pytest.mark.parametrize(
    "bits, group, sym, salient",
    [(4, 32, True, []), (3, 32, False, []), (2, 64, False, [3, 40, 77, 100]), (4, -1, True, [9])],
)
def test_gptq_natural_order_is_algorithm_1(bits, group, sym, salient):
    W, H = _problem(seed=bits)
    g = W.shape[1] if group == -1 else group
    codes, sal_w, scales, zeros = algorithm_1(W, H, salient, bits, g, sym)
    qw = _gptq(W, H, salient, bits=bits, group_size=group, sym=sym, order="natural")
    assert torch.equal(qw.codes, codes.to(torch.int32))
    assert torch.equal(qw.scales.double(), scales) and torch.equal(qw.zeros.double(), zeros)
    if salient:  # compensated columns: same values up to fp32 vs fp64 arithmetic
        assert torch.allclose(qw.salient_weight.double(), sal_w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", ["natural", "act", "gar"])
def test_block_size_does_not_change_the_codes(order):
    W, H = _problem(seed=5, K=256)
    salient = [0, 31, 32, 200]
    runs = [
        _gptq(W, H, salient, bits=3, group_size=32, sym=False, order=order, block_size=b)
        for b in (1, 7, 32, 128, 256)
    ]
    for qw in runs[1:]:
        assert torch.equal(qw.codes, runs[0].codes), order
        assert torch.equal(qw.scales, runs[0].scales) and torch.equal(qw.zeros, runs[0].zeros)


# ------------------------------------------------------------------------------------------
# clip search


def _clip_error(w, bits, sym, shrink, norm):
    """sum |w - Q(w)|^norm per row of ``w`` [R, n] on the grid of the range shrunk by ``shrink``,
    built here from the definition (range holding 0, fp16 scale, integer zero)."""
    scale, zero = _fit(w.double() * shrink, bits, sym)
    s, z = scale[:, None], zero[:, None]
    q = torch.clamp(torch.round(w.double() / s) + z, 0, 2**bits - 1)
    return (s * (q - z) - w.double()).abs().pow(norm).sum(1)


@pytest.mark.parametrize("bits, sym", [(2, False), (3, False), (4, True)])
def test_clip_search_is_within_one_percent_of_the_exhaustive_optimum(bits, sym):
    g = torch.Generator().manual_seed(bits)
    # heavy-tailed weights (Student t, 3 dof), the case where clipping matters
    with torch.random.fork_rng():  # the distribution samples from the global generator
        torch.manual_seed(bits)
        w = torch.distributions.StudentT(3.0).sample((128, 4, 64)) * 0.02
    w[torch.rand(w.shape, generator=g) < 0.01] *= 8
    grid = Grid(bits=bits, sym=sym, mse_clip=True)
    scale, zero = fit_params(w, grid)
    rows = w.reshape(-1, 64)
    s, z = scale.reshape(-1, 1).double(), zero.reshape(-1, 1).double()
    q = torch.clamp(torch.round(rows.double() / s) + z, 0, grid.maxq)
    chosen = (s * (q - z) - rows.double()).abs().pow(grid.clip_norm).sum(1)
    n_cand = int(grid.clip_max_shrink * grid.clip_grid)
    best = torch.stack(
        [
            _clip_error(rows, bits, sym, 1 - i / grid.clip_grid, grid.clip_norm)
            for i in range(n_cand)
        ]
    ).amin(0)
    assert torch.all(chosen >= best * (1 - 1e-9)), "the search cannot beat the exhaustive one"
    near = (chosen <= best * 1.01).double().mean()
    print(f"w{bits}: {near:.2%} of {rows.shape[0]} groups within 1% of the exhaustive optimum")
    assert near >= 0.99, f"only {near:.3%} of groups within 1% of the optimum"


# ------------------------------------------------------------------------------------------
# training loss


def _chat_file(path, n: int = 8):
    """Chat records whose answers differ a lot in length, so label masks are uneven."""
    answers = ["Yes.", "A city in France on the river Seine, known for art and food."]
    records = [
        {"prompt": f"Question {i}?", "response": answers[i % 2] * (1 + i % 3)} for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def chat_model_dir(tiny_model_dirs, tmp_path):
    """A copy of the tiny llama whose tokenizer has a chat template."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path / "chat-llama"
    shutil.copytree(tiny_model_dirs("llama"), path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tok.save_pretrained(path)
    return path


def _train_head(path, data, out, **cfg):
    """Train only lm_head of the tiny model (float32) with the project's loop; metrics rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gift_quant.recipe import TrainConfig
    from gift_quant.train.loop import train

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for name, p in model.named_parameters():
        p.requires_grad_(name == "lm_head.weight")
    tc = TrainConfig(
        data=str(data), seq_len=32, lr=1e-2, warmup_ratio=0.0, dtype="float32", save_every=0, **cfg
    )
    train(model, AutoTokenizer.from_pretrained(path), tc, out, fingerprint={}, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return model, rows


def test_loss_is_token_weighted_across_micro_batches(tiny_model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gift_quant.train.data import IGNORE, build_train_data

    path = chat_model_dir(tiny_model_dirs, tmp_path)
    data = _chat_file(tmp_path / "chat.jsonl")
    batch = build_train_data(str(data), AutoTokenizer.from_pretrained(path), 32, 0).batch(0, 4)
    counts = (batch.labels[:, 1:] != IGNORE).sum(1)
    assert counts[:2].sum() != counts[2:].sum(), "the two micro-batches must differ in tokens"
    # the oracle: mean CE over every label token of the step's 4 rows, one forward pass
    fresh = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = fresh(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1)
    )
    one, rows_one = _train_head(path, data, tmp_path / "a", steps=2, batch_size=4, grad_accum=1)
    two, rows_two = _train_head(path, data, tmp_path / "b", steps=2, batch_size=2, grad_accum=2)
    assert rows_one[0]["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert rows_two[0]["loss"] == pytest.approx(float(expected), rel=1e-5)
    for a, b in zip(rows_one, rows_two, strict=True):  # same gradient, hence same step
        assert a["tokens"] == b["tokens"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    moved = float((one.lm_head.weight - fresh.lm_head.weight).abs().max())
    assert torch.allclose(one.lm_head.weight, two.lm_head.weight, rtol=0, atol=1e-3 * moved)


def test_recover_lowers_the_training_loss(tiny_model_dirs, tmp_path):
    """GIFT-SW (salient columns + noise) on a fixed set of 8 windows: the step loss over the
    same windows falls."""
    from conftest import tiny_recipe

    from gift_quant.pipeline import recover

    text = tmp_path / "train.txt"
    from gift_quant.assets import wiki_split

    text.write_text(wiki_split("train")[0][:1500])
    recipe = tiny_recipe(
        tiny_model_dirs("llama"),
        f"train.data={text}",
        "train.steps=12",
        "train.batch_size=4",
        "train.grad_accum=2",
        "train.seq_len=32",
        "train.lr=1e-2",
        "train.save_every=0",
        "calib.true_sequential=false",
    )
    recover(recipe, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run/train/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    print("step losses", [round(x, 3) for x in losses])
    assert len(losses) == 12 and all(r["tokens"] == rows[0]["tokens"] for r in rows)
    # from ~6.25 (log 512: a random model) it falls about 0.1 nats in 12 steps, step after step
    assert max(losses[-3:]) < min(losses[:3]) and losses[-1] < losses[0] - 0.05, losses
