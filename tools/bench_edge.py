"""Edge deployment of SmolLM2 exports on this machine's CPU: ONNX (onnxruntime) and torch paths.

    PYTHONPATH=. python tools/bench_edge.py EXPORT_DIR [EXPORT_DIR ...] --work DIR
        [--ppl-tokens 2048] [--decode 32] [--prefill 512] [--out FILE.json]

For each export directory (e.g. SmolLM2 w4/w3/w2 g64 + 3% salient from ``quantize``), in one
run: export it to ONNX (``--work``/<name>-onnx, reused when present), then
  * logits of onnxruntime vs our loader (fp32) on one held-out window, max |diff|;
  * held-out perplexity by both, on the same non-overlapping 512-token windows of the embedded
    held-out Wikipedia articles (the first ``--ppl-tokens`` tokens);
  * ONNX file size;
  * greedy decode tokens/s at batch 1 (16-token prompt, ``--decode`` new tokens, KV cache) and
    the time of a ``--prefill``-token prefill, for: fp32 torch (the unquantized model),
    onnxruntime, our torch CPU path (Backend.CPU, AUTO's pick) and the dequantize-every-call
    reference (Backend.TORCH); ratios are against fp32 torch of the same run.
Prints a table and writes one JSON row per export with the commit, versions, CPU model and
``machine_shared`` (the machine is shared with other jobs: absolute times are noisy, the ratios
of one run are the figures to read).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import add_arguments, provenance, shared_flag, stamp, write_json  # noqa: E402

from gift_quant.data import eval_windows, load_documents, tokenize_documents  # noqa: E402
from gift_quant.io.load import load_quantized  # noqa: E402
from gift_quant.io.onnx import ONNX_FILE, export_onnx  # noqa: E402
from gift_quant.kernels import Backend  # noqa: E402
from gift_quant.mixed_linear import MixedLinear  # noqa: E402

PROMPT = 16


def environment(shared: bool) -> dict:
    """The tools' common stamp plus onnxruntime's version and torch's thread count."""
    import onnxruntime

    return {
        **provenance(shared),
        "onnxruntime": onnxruntime.__version__,
        "threads": torch.get_num_threads(),
    }


class OrtDecoder:
    """An onnxruntime session of an exported model with its KV-cache feeds."""

    def __init__(self, onnx_dir: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(
            str(onnx_dir / ONNX_FILE), opts, providers=["CPUExecutionProvider"]
        )
        self.kv = json.loads((onnx_dir / "onnx_export.json").read_text())["kv_cache"]

    def __call__(self, ids: np.ndarray, past=None):
        feeds = {"input_ids": ids}
        kv = self.kv
        for i in range(kv["num_layers"]):
            for j, name in enumerate(("key", "value")):
                empty = np.zeros((ids.shape[0], kv["kv_heads"], 0, kv["head_dim"]), np.float32)
                feeds[f"past_key_values.{i}.{name}"] = empty if past is None else past[2 * i + j]
        past_len = 0 if past is None else past[0].shape[2]
        feeds["attention_mask"] = np.ones((ids.shape[0], past_len + ids.shape[1]), np.int64)
        out = self.sess.run(None, feeds)
        return out[0], out[1:]


def ppl_of_logits(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    lp = torch.from_numpy(logits[:, :-1]).float().log_softmax(-1)
    nll = -lp.gather(-1, torch.from_numpy(ids[:, 1:]).unsqueeze(-1)).sum()
    return float(nll), ids[:, 1:].size


@torch.no_grad()
def torch_decode(model, prompt: torch.Tensor, steps: int) -> float:
    """Greedy decode tokens/s at batch 1 with the transformers KV cache."""
    out = model(input_ids=prompt, use_cache=True)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - t0)


def ort_decode(dec: OrtDecoder, prompt: np.ndarray, steps: int) -> float:
    logits, past = dec(prompt)
    tok = logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, past = dec(tok.astype(np.int64), past)
        tok = logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - t0)


@torch.no_grad()
def torch_prefill(model, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t0


def set_backend(model, backend: Backend) -> None:
    for m in model.modules():
        if isinstance(m, MixedLinear):
            m.backend = backend


def bench_export(src: Path, args, fp32, tok, windows, fp32_speed) -> dict:
    onnx_dir = Path(args.work) / f"{src.name}-onnx"
    t0 = time.perf_counter()
    report = export_onnx(src, onnx_dir) if not onnx_dir.exists() else None
    export_s = time.perf_counter() - t0 if report else None
    dec = OrtDecoder(onnx_dir, torch.get_num_threads())
    model = load_quantized(src, dtype=torch.float32)
    row = {"export": src.name, "onnx_export_seconds": export_s}
    row["bits"] = sorted({m.bits for m in model.modules() if isinstance(m, MixedLinear)})
    row["onnx_bytes"] = sum(
        f.stat().st_size for f in onnx_dir.iterdir() if f.name.startswith(ONNX_FILE)
    )
    nll_ort = nll_torch = 0.0
    count = 0
    max_diff = max_ref = 0.0
    for i, w in enumerate(windows):
        ids = w.unsqueeze(0)
        logits, _ = dec(ids.numpy())
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits.numpy()
        if i == 0:
            max_diff = float(np.abs(logits - ref).max())
            max_ref = float(np.abs(ref).max())
        a, n = ppl_of_logits(logits, ids.numpy())
        b, _ = ppl_of_logits(ref, ids.numpy())
        nll_ort, nll_torch, count = nll_ort + a, nll_torch + b, count + n
    row.update(
        logits_max_abs_diff=max_diff,
        logits_max_abs=max_ref,
        ppl_onnxruntime=math.exp(nll_ort / count),
        ppl_torch_loader=math.exp(nll_torch / count),
        ppl_tokens=count,
    )
    prompt = windows[0, :PROMPT].unsqueeze(0)
    long = windows.reshape(-1)[: args.prefill].unsqueeze(0)
    speed = {"fp32_torch": fp32_speed}
    speed["onnxruntime"] = {
        "decode_tok_s": ort_decode(dec, prompt.numpy(), args.decode),
        "prefill_s": _timed(lambda: dec(long.numpy())),
    }
    for name, backend in (("torch_cpu_path", Backend.CPU), ("torch_dequant_every_call", None)):
        set_backend(model, backend or Backend.TORCH)
        steps = args.decode if backend else max(4, args.decode // 8)  # the slow one: fewer
        speed[name] = {
            "decode_tok_s": torch_decode(model, prompt, steps),
            "prefill_s": torch_prefill(model, long),
        }
    for v in speed.values():
        v["decode_vs_fp32"] = v["decode_tok_s"] / fp32_speed["decode_tok_s"]
        v["prefill_speedup_vs_fp32"] = fp32_speed["prefill_s"] / v["prefill_s"]
    row["speed"] = speed
    return row


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("exports", nargs="+", type=Path)
    p.add_argument("--work", required=True, help="directory for the ONNX exports")
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--out", default="benchmarks/results/edge_smollm2.json")
    add_arguments(p)
    args = p.parse_args()
    shared = shared_flag(p, args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    from gift_quant.modeling import load_model
    from gift_quant.recipe import ModelConfig

    fp32, tok = load_model(ModelConfig())
    fp32 = fp32.float().eval()
    tokens = tokenize_documents(tok, load_documents("wiki-heldout"))
    windows = eval_windows(tokens, 512, args.ppl_tokens)
    prompt = windows[0, :PROMPT].unsqueeze(0)
    fp32_speed = {
        "decode_tok_s": torch_decode(fp32, prompt, args.decode),
        "prefill_s": torch_prefill(fp32, windows.reshape(-1)[: args.prefill].unsqueeze(0)),
    }
    rows = [bench_export(src, args, fp32, tok, windows, fp32_speed) for src in args.exports]
    env = environment(shared)
    result = {
        "setup": (
            f"SmolLM2-135M-Instruct exports; perplexity on {windows.shape[0]} x 512 held-out "
            f"wiki tokens; decode: {PROMPT}-token prompt + {args.decode} greedy tokens at "
            f"batch 1 ({max(4, args.decode // 8)} for the dequantize-every-call path); "
            f"prefill {args.prefill} tokens; {env['threads']} threads"
        ),
        "rows": [stamp(dict(r), env) for r in rows],
    }
    write_json(args.out, result)
    hdr = f"{'export':10s} {'path':26s} {'decode tok/s':>12s} {'x fp32':>7s} {'prefill s':>9s}"
    print(hdr)
    for r in rows:
        for name, v in r["speed"].items():
            print(
                f"{r['export']:10s} {name:26s} {v['decode_tok_s']:12.2f} "
                f"{v.get('decode_vs_fp32', 1):7.2f} {v['prefill_s']:9.2f}"
            )
        print(
            f"{r['export']:10s} ppl ort {r['ppl_onnxruntime']:.4g} torch "
            f"{r['ppl_torch_loader']:.4g}; logits max diff {r['logits_max_abs_diff']:.2e} "
            f"(max |logit| {r['logits_max_abs']:.1f}); onnx {r['onnx_bytes'] / 2**20:.1f} MiB"
        )


if __name__ == "__main__":
    main()
