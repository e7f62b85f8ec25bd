"""Greedy CPU decode, eager against ``torch.compile``: fp32 torch and our CPU path.

    PYTHONPATH=. python tools/bench_cpu_compile.py EXPORT_DIR --idle [--decode 32] [--repeats 3]
        [--out FILE.json]

The export is loaded on the CPU path (``load_quantized``, fp32: ``Backend.CPU``, the packed
kernel for decode); the fp32 model is the embedded default (SmolLM2-135M-Instruct). Each model
decodes greedily at batch 1 from a 16-token prompt with transformers' ``StaticCache`` (fixed
shapes, what ``torch.compile`` wants), ``--decode`` new tokens, eager and through
``torch.compile(model, dynamic=False)`` (inductor); the compile is timed apart (the first
compiled step of a warm-up decode). The four paths run in turn, ``--repeats`` rounds; each
figure is the median of its rounds. Also recorded: Dynamo's graph breaks and graphs over the
whole run (0 breaks and one graph a model when the kernels are ops the graph keeps), and the
largest difference between the compiled and the eager logits of the first decode step of each
model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import add_arguments, provenance, shared_flag, stamp, write_json  # noqa: E402

from gift_quant.io.load import load_quantized  # noqa: E402

PROMPT = 16


@torch.no_grad()
def decode(model, forward, prompt: torch.Tensor, steps: int) -> tuple[float, torch.Tensor, float]:
    """Tokens/s of ``steps`` greedy steps by ``forward`` (the prompt's prefill by ``model``,
    eager), the logits of the first step and its seconds (a compiled model's compile)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=PROMPT + steps)
    out = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(PROMPT))
    tok = out.logits[:, -1:].argmax(-1)
    first = first_s = None
    t0 = time.perf_counter()
    for i in range(steps):
        pos = torch.tensor([PROMPT + i])
        out = forward(input_ids=tok, past_key_values=cache, cache_position=pos)
        if first is None:
            first, first_s = out.logits.clone(), time.perf_counter() - t0
        tok = out.logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - t0), first, first_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/cpu_compile_smollm2.json")
    add_arguments(p)
    args = p.parse_args()
    shared = shared_flag(p, args)
    if args.decode < 1 or args.repeats < 1:
        p.error("--decode and --repeats must be at least 1")
    if not (args.export / "config.json").is_file():
        p.error(f"{args.export} is not a model directory (no config.json)")
    import torch._dynamo

    from gift_quant.modeling import load_model
    from gift_quant.recipe import ModelConfig

    fp32 = load_model(ModelConfig())[0].float().eval()
    ours = load_quantized(args.export, dtype=torch.float32)
    prompt = torch.randint(
        0, fp32.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0)
    )
    paths, compile_s, diff = {}, {}, {}
    for name, model in (("fp32_torch", fp32), ("torch_cpu_path", ours)):
        compiled = torch.compile(model, dynamic=False)
        # compiles at the timed shapes: the first step's time
        _, first_c, compile_s[name] = decode(model, compiled, prompt, args.decode)
        _, first_e, _ = decode(model, model, prompt, args.decode)
        diff[name] = float((first_c - first_e).abs().max())
        paths[name] = lambda m=model: decode(m, m, prompt, args.decode)[0]
        paths[name + "_compiled"] = lambda m=model, c=compiled: decode(m, c, prompt, args.decode)[0]
    rounds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):  # in turn, so a change in the machine's load hits every path
        for name, run in paths.items():
            rounds[name].append(run())
    counters = torch._dynamo.utils.counters
    env = {**provenance(shared), "threads": torch.get_num_threads()}
    speed = {name: statistics.median(r) for name, r in rounds.items()}
    result = stamp(
        {
            "setup": (
                f"{args.export.name} and the fp32 SmolLM2-135M-Instruct; greedy decode at batch 1, "
                f"{PROMPT}-token prompt, {args.decode} new tokens, StaticCache; torch.compile "
                f"(inductor, dynamic=False); median of {args.repeats} rounds of the four paths"
            ),
            "decode_tok_s": speed,
            "rounds": rounds,
            "compile_s": compile_s,
            "compiled_vs_eager_max_abs_logit_diff": diff,
            "graph_breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"]["unique_graphs"],
        },
        env,
    )
    write_json(args.out, result)
    base = speed["fp32_torch"]
    print(f"{'path':26s} {'decode tok/s':>12s} {'x fp32 eager':>12s} {'compile s':>9s}")
    for name, v in speed.items():
        c = compile_s.get(name.removesuffix("_compiled")) if name.endswith("_compiled") else None
        print(f"{name:26s} {v:12.2f} {v / base:12.2f} " + (f"{c:9.1f}" if c else f"{'':9s}"))
    print(
        f"graph breaks {result['graph_breaks']}, graphs {result['unique_graphs']}; compiled - "
        f"eager logits, max |diff|: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items())
    )


if __name__ == "__main__":
    main()
