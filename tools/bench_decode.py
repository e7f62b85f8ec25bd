"""End-to-end decode speed of a 7B-shaped Llama: fp16 (or bf16) vs W4 g128 + 128 salient columns.

    PYTHONPATH=. python3 tools/bench_decode.py [--layers 32] [--tokens 128] [--batch 1 16]
        [--compile [B ...] [--inductor-pdl]] [--fuse] [--bound] [--dtype fp16|bf16]
        [--out DIR] [--workdir DIR] [--shared]

``--dtype bf16``: the same in bf16 (the dense model, the activations and the kernels' bf16
builds; rows keyed "bf16", written to decode_<gpu>_bf16.json, <gpu> the GPU's tag: h200, h100).

The model is built from a LlamaConfig (hidden 4096, MLP 11008, 32 layers, 32 heads, vocab
32000) with random weights on the GPU in fp16 and timed first. Then every Linear of every
decoder block is quantized with RTN (4 bits, group 128, symmetric, no clipping search) keeping
the 128 input columns of largest L2 norm in fp16 (no calibration data on the GPU machine),
exported with ``save_quantized`` and read back with ``load_quantized(device="cuda")`` (AUTO
backend: the Triton kernels). Decoding uses a static KV cache and one CUDA graph per decode
step (greedy, the next token fed back inside the graph); tokens/s = batch * steps / wall time
of the replays, for every --batch (fp16 and W4 in the same run). The script also checks the
quantized model's logits against the torch backend. The JSON records the commit, the versions,
GPU/CPU, whether the machine was shared, and the kernel
route of every distinct (N, K) layer at every batch. After each model's timings the rows so far
go to ``NAME.partial.json`` ("complete": false), removed when the full JSON is written: a run
stopped by a time limit keeps what it measured.

``--bound`` also times the fp16 model with every decoder projection replaced by a stand-in that
does no GPU work (it returns an unwritten tensor of the output's shape): the time of everything
but the projections. fp16 tokens/s over it is the most any weight format can gain end to end
with this model code ("bound" in the table).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import gpu_tag, write_json  # noqa: E402

from gift_quant.fused import fuse_siblings  # noqa: E402
from gift_quant.io.export import save_quantized  # noqa: E402
from gift_quant.io.load import load_quantized  # noqa: E402
from gift_quant.kernels import ACTIVATION_DTYPES  # noqa: E402
from gift_quant.mixed_linear import MixedLinear  # noqa: E402
from gift_quant.modeling import set_module  # noqa: E402
from gift_quant.quant import QUANTIZERS  # noqa: E402
from gift_quant.recipe import QuantConfig  # noqa: E402
from gift_quant.testing import run_environment  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(layers: int, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


@torch.no_grad()
def quantize_in_place(model, salient: int, dtype: torch.dtype) -> None:
    cfg = QuantConfig(method="rtn", bits=4, group_size=128, sym=True, mse_clip=False)
    rtn = QUANTIZERS.get("rtn")
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            W = mod.weight.float()
            idx = torch.sort(torch.topk(W.norm(dim=0), salient).indices).values
            layer = MixedLinear.from_quantized(rtn(W, None, idx, cfg), mod.bias, dtype=dtype)
            set_module(model, name, layer)
    torch.cuda.empty_cache()


@torch.library.custom_op("gift_quant_bench::no_matmul", mutates_args=())
def no_matmul(x: torch.Tensor, out_features: int) -> torch.Tensor:
    """An unwritten [..., out_features] tensor: no GPU work. An opaque op, so that a compiled
    forward still computes x (a plain torch.empty would let inductor drop everything that
    only feeds a projection: norms, rotary, attention, the MLP's activation)."""
    return torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)


@no_matmul.register_fake
def _(x: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class NoMatmul(torch.nn.Module):
    """A projection that costs nothing on the GPU (the values are only timed, never used)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return no_matmul(x, self.out_features)


def strip_projections(model) -> None:
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            set_module(model, name, NoMatmul(mod.out_features))
    torch.cuda.empty_cache()


def mixed_modules(model) -> list[MixedLinear]:
    return [m for m in model.modules() if isinstance(m, MixedLinear)]


def make_cache(model, max_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


@torch.no_grad()
def decode_tokens_per_s(model, prompt: torch.Tensor, steps: int, forward=None) -> dict:
    """Greedy decode after ``prompt``: one CUDA graph per step (eager if capture fails). The
    prompt goes through ``model``, the steps through ``forward`` (default: ``model``; a
    compiled forward then sees only decode steps, with the static cache filled). Before the
    timing, four replays of the step are checked against ``model`` run eagerly (no graph, not
    compiled) on a cache of its own fed the same tokens: the largest relative difference of
    their logits is ``logits_rel_diff_vs_eager``."""
    forward = forward or model
    P = prompt.shape[1]
    cache = make_cache(model, P + steps + 12)
    out = model(
        input_ids=prompt,
        past_key_values=cache,
        use_cache=True,
        cache_position=torch.arange(P, device=prompt.device),
    )
    ids = out.logits[:, -1:].argmax(-1)
    pos = torch.tensor([P], device=prompt.device)
    logits = out.logits[:, -1].clone()  # the last step's
    fed: list[torch.Tensor] = []  # every step's input ids, in order (for the check)

    def step():
        o = forward(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=pos)
        logits.copy_(o.logits[:, -1])
        ids.copy_(o.logits[:, -1:].argmax(-1))

    def untimed(run) -> torch.Tensor:  # one step outside the timing: its logits
        fed.append(ids.clone())
        run()
        pos.add_(1)
        return logits.float().clone()

    for _ in range(3):  # warm-up: Triton compiles, workspaces, cache allocation
        untimed(step)
    mode, graph = "cuda-graph", None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fed.append(ids.clone())
            step()
        torch.cuda.current_stream().wait_stream(s)
        pos.add_(1)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except Exception as exc:  # noqa: BLE001 - fall back to eager steps, reported
        print(f"graph capture failed ({exc!r:.200}); timing eager steps", flush=True)
        mode, graph = "eager", None
    run = graph.replay if graph is not None else step
    got = [untimed(run) for _ in range(4)]
    rel = check_against_eager(model, prompt, fed, got)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
        pos.add_(1)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return dict(
        mode=mode,
        batch=prompt.shape[0],
        steps=steps,
        seconds=dt,
        tokens_per_s=prompt.shape[0] * steps / dt,
        ms_per_step=1e3 * dt / steps,
        # (none where it is not a number: the no-projections model's logits are never written)
        logits_rel_diff_vs_eager=rel if math.isfinite(rel) else None,
    )


@torch.no_grad()
def check_against_eager(model, prompt, fed: list, got: list) -> float:
    """``model`` run eagerly on a fresh cache: the prompt, then the ids ``fed`` one step each;
    the largest relative difference between its logits at the last len(got) steps and
    ``got``."""
    P = prompt.shape[1]
    cache = make_cache(model, P + len(fed) + 1)
    model(
        input_ids=prompt,
        past_key_values=cache,
        use_cache=True,
        cache_position=torch.arange(P, device=prompt.device),
    )
    rel = 0.0
    for i, inp in enumerate(fed):
        pos = torch.tensor([P + i], device=prompt.device)
        ref = model(input_ids=inp, past_key_values=cache, use_cache=True, cache_position=pos)
        j = i - (len(fed) - len(got))
        if j >= 0:
            ref = ref.logits[:, -1].float()
            rel = max(rel, float((got[j] - ref).norm() / ref.norm()))
    return rel


def timed(model, prompts: dict, args, compile_it: bool = True) -> tuple[dict, dict | None]:
    """Decode speed per batch size; with --compile (and ``compile_it``) also through a
    torch.compile'd forward (inductor fuses the norms, rotary and residual adds; the custom ops
    stay opaque calls)."""
    eager = {b: decode_tokens_per_s(model, prompts[b], args.tokens) for b in args.batch}
    if args.compile is None or not compile_it:
        return eager, None
    import torch._dynamo

    compiled = {}
    for b in compiled_batches(args):
        # a fresh compile per model and batch: dynamo's caches are per code object, so a second
        # model's forward would otherwise count against the first's recompile limit and run
        # eager; the limit is raised past the one graph per decoder layer a warm-up may take
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = 64
        forward = torch.compile(model.forward, dynamic=False)
        t0 = time.perf_counter()
        compiled[b] = decode_tokens_per_s(model, prompts[b], args.tokens, forward)
        compiled[b]["compile_and_run_s"] = time.perf_counter() - t0
    return eager, compiled


def layer_shapes(qmodel) -> set[tuple]:
    """(N, K, bits, group, salient columns) of every distinct quantized layer."""
    shapes = set()
    for m in mixed_modules(qmodel):
        group = m.in_features if m.group_size == -1 else m.group_size
        shapes.add((m.out_features, m.in_features, m.bits, group, m.salient_idx.numel()))
    return shapes


def triton_vs_torch(qmodel, prompt: torch.Tensor) -> float:
    """Relative difference of the logits through the GPU kernels and through the torch
    backend, on the same model."""
    with torch.no_grad():
        got = qmodel(prompt).logits.float()
        for m in mixed_modules(qmodel):
            m.backend = "torch"
        ref = qmodel(prompt).logits.float()
        for m in mixed_modules(qmodel):
            m.backend = "auto"
    return float((got - ref).norm() / ref.norm())


def compiled_batches(args) -> list[int]:
    """The batch sizes timed compiled: those --compile names, or every --batch if it names
    none."""
    return [b for b in args.batch if not args.compile or b in args.compile]


def table_rows(runs: dict, batches: list[int], D: str) -> list[dict]:
    """One row per (batch, eager or compiled) from the variants timed so far, with the ratios
    whose variants are all there (a run cut short still gives rows; ``D``: the dense model's
    key)."""
    rows = []
    for compiled in (False, True):
        for b in batches:
            got = {k: v[compiled][b] for k, v in runs.items() if v[compiled] and b in v[compiled]}
            if D not in got:
                continue
            row = dict(batch=b, **({"compiled": True} if compiled else {}), **got)
            dense = got[D]["tokens_per_s"]
            if "w4" in got:
                row["ratio"] = got["w4"]["tokens_per_s"] / dense
            if "w4_fused" in got:
                fused = got["w4_fused"]["tokens_per_s"]
                row["ratio_fused"] = fused / dense
                if f"{D}_fused" in got:
                    row[f"ratio_fused_vs_{D}_fused"] = fused / got[f"{D}_fused"]["tokens_per_s"]
            if "no_matmul" in got:
                row["bound"] = got["no_matmul"]["tokens_per_s"] / dense
                if f"{D}_fused" in got:
                    row[f"bound_vs_{D}_fused"] = (
                        got["no_matmul"]["tokens_per_s"] / got[f"{D}_fused"]["tokens_per_s"]
                    )
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--salient", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument(
        "--compile",
        type=int,
        nargs="*",
        default=None,
        metavar="B",
        help="also time both models with torch.compile'd forward (the same graphs around it), "
        "at the batch sizes given (default: every --batch); each size compiles anew",
    )
    ap.add_argument(
        "--fuse",
        action="store_true",
        help="also time both models with their sibling layers fused (q/k/v, gate/up: "
        "gift_quant.fused.fuse_siblings), the fp16 one as concatenated Linears",
    )
    ap.add_argument(
        "--inductor-pdl",
        action="store_true",
        help="compile with inductor's programmatic dependent launch (its kernels wait for the "
        "previous kernel only before their first dependent load and let the next one launch "
        "early), for every model alike; the JSON gets the suffix _inductor_pdl",
    )
    ap.add_argument(
        "--bound",
        action="store_true",
        help="also time the fp16 model with its projections doing no work (the end-to-end "
        "ceiling of any weight format)",
    )
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"), help="the model's")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--shared", action="store_true", help="other work ran on the machine")
    args = ap.parse_args()
    if args.compile and not set(args.compile) <= set(args.batch):
        ap.error(f"--compile {args.compile}: each size must be one of --batch {args.batch}")
    if args.inductor_pdl:
        import torch._inductor.config as inductor

        if not hasattr(inductor.triton, "enable_pdl"):
            ap.error(f"--inductor-pdl: torch {torch.__version__}'s inductor has no PDL option")
        if args.compile is None:
            ap.error("--inductor-pdl changes compiled runs only: add --compile")
        inductor.triton.enable_pdl = True
    env = run_environment(args.shared)  # before any work: a wrong GIFT_QUANT_COMMIT is refused
    D = args.dtype  # the dense model's key in the runs and rows
    dtype = ACTIVATION_DTYPES[D]
    env["dtype"] = D
    env["inductor_pdl"] = args.inductor_pdl
    out = Path(args.out)
    name = f"decode_{gpu_tag()}" + ("" if D == "fp16" else f"_{D}")
    name += "_inductor_pdl.json" if args.inductor_pdl else ".json"
    # after each model's timings, the rows so far to NAME.partial.json (removed once NAME is
    # written): a run stopped part-way, by a time limit or a crash, still leaves what it timed
    partial = name.removesuffix(".json") + ".partial.json"

    def timed_so_far(what: str) -> None:
        print(f"{what}: {runs[what]} ({time.time() - t0:.0f}s)", flush=True)
        rows = table_rows(runs, args.batch, D)
        done = dict(complete=False, seconds=round(time.time() - t0, 1), layers=args.layers)
        write_json(out / partial, dict(**env, **done, rows=rows))

    t0 = time.time()
    model = build_model(args.layers, dtype)
    prompts = {b: torch.randint(0, 32000, (b, 16), device="cuda") for b in args.batch}
    prompt = prompts[args.batch[0]]
    runs = {}  # model variant -> (eager, compiled) per batch
    runs[D] = timed(model, prompts, args)
    timed_so_far(D)
    quantize_in_place(model, args.salient, dtype)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gq-decode-"))
    workdir.mkdir(parents=True, exist_ok=True)
    export = save_quantized(model, workdir / "w4g128s128")
    del model
    torch.cuda.empty_cache()
    print(f"exported to {export} ({time.time() - t0:.0f}s)", flush=True)
    if args.fuse:  # the fp16 model again (same seed), its sibling Linears fused
        model = build_model(args.layers, dtype)
        fuse_siblings(model, linear=True)
        runs[f"{D}_fused"] = timed(model, prompts, args)
        timed_so_far(f"{D}_fused")
        del model
        torch.cuda.empty_cache()
    if args.bound:
        model = build_model(args.layers, dtype)
        strip_projections(model)
        runs["no_matmul"] = timed(model, prompts, args)
        timed_so_far("no_matmul")
        del model
        torch.cuda.empty_cache()
    qmodel = load_quantized(export, device="cuda", dtype=dtype)
    n_mixed = len(mixed_modules(qmodel))
    shapes = layer_shapes(qmodel)
    rel = {"w4": triton_vs_torch(qmodel, prompt)}
    runs["w4"] = timed(qmodel, prompts, args, compile_it=not args.fuse)  # fused: compiled below
    timed_so_far("w4")
    fused_groups = []
    if args.fuse:
        fused_groups = fuse_siblings(qmodel)
        rel["w4_fused"] = triton_vs_torch(qmodel, prompt)
        runs["w4_fused"] = timed(qmodel, prompts, args)
        timed_so_far("w4_fused")
    from gift_quant.kernels.cuda import native
    from gift_quant.kernels.triton import routes, tuning

    shapes |= layer_shapes(qmodel)  # the fused layers' too
    mma = native.library() is not None
    wg = native.wg_available()
    rows = table_rows(runs, args.batch, D)
    res = dict(
        **env,
        complete=True,
        routes={  # after the timed runs: the measured choices where the op made them
            f"M={m} {n}x{k} w{b}": routes.route_in_force(m, n, k, b, g, s, mma, wg=wg, dtype=dtype)
            for m in args.batch
            for n, k, b, g, s in sorted(shapes)
        },
        layers=args.layers,
        mixed_layers=n_mixed,
        fused_groups_per_layer=[[n.rpartition(".")[2] for n in g] for g in fused_groups[:2]],
        rows=rows,
        logits_rel_diff_triton_vs_torch=rel["w4"],
        logits_rel_diff_triton_vs_torch_fused=rel.get("w4_fused"),
        tuning=tuning.record(),  # what the op measured at first use
    )
    print(f"\n{args.layers} layers; logits triton vs torch rel {rel}")
    for r in rows:  # each timed step's logits against its own model run eagerly
        diffs = {k: v["logits_rel_diff_vs_eager"] for k, v in r.items() if isinstance(v, dict)}
        mode = "compiled + graph" if r.get("compiled") else "graph"
        print(f"batch {r['batch']} {mode}: logits rel diff vs eager {diffs}")
    cols = [k for k in (D, f"{D}_fused", "w4", "w4_fused", "no_matmul") if k in runs]
    ratios = [
        k
        for k in ("ratio", "ratio_fused", f"ratio_fused_vs_{D}_fused")
        if args.fuse or k == "ratio"
    ]
    if args.bound:
        ratios += ["bound"] + ([f"bound_vs_{D}_fused"] if args.fuse else [])
    print("| batch | " + " | ".join([f"{c} tok/s" for c in cols] + ratios) + " |")
    print("|---" * (len(cols) + len(ratios) + 1) + "|")
    for r in res["rows"]:
        mode = " compiled" if r.get("compiled") else ""
        cells = [f"{r[c]['tokens_per_s']:.1f}" if c in r else "-" for c in cols]
        cells += [f"{r[k]:.2f}x" if k in r else "-" for k in ratios]
        print(f"| {r['batch']}{mode} | " + " | ".join(cells) + " |")
    write_json(out / name, res)
    (out / partial).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
