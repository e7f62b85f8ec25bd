"""Edge deployment of SmolLM2 exports on this machine's CPU: ONNX (onnxruntime) and torch paths.

    PYTHONPATH=. python tools/bench_edge.py EXPORT_DIR [EXPORT_DIR ...] --work DIR --shared
        [--ppl-tokens 2048] [--decode 32] [--prefill 512] [--repeats 3] [--out FILE.json]

For each export directory (e.g. SmolLM2 w4/w3/w2 g64 + 3% salient from ``quantize``), in one
run: export it to ONNX (``--work``/<name>-onnx, reused when present), then
  * logits of onnxruntime vs our loader (fp32) on one held-out window, max |diff|;
  * held-out perplexity by both, on the same non-overlapping 512-token windows of the embedded
    held-out Wikipedia articles (the first ``--ppl-tokens`` tokens);
  * ONNX file size, and what an onnxruntime session of it adds to a fresh process's resident
    memory (default options, in a child process; Linux);
  * greedy decode tokens/s at batch 1 (16-token prompt, ``--decode`` new tokens, KV cache) and
    the time of a ``--prefill``-token prefill, for: fp32 torch (the unquantized model),
    onnxruntime, our torch CPU path (Backend.CPU, AUTO's pick) and the dequantize-every-call
    reference (Backend.TORCH). The four paths are timed in turn, ``--repeats`` rounds, and each
    figure is the median of its rounds (also the process CPU time per token, steadier than wall
    time when other jobs share the cores); ratios are against fp32 torch of the same rounds.
Prints a table and writes one JSON row per export with the commit, versions, CPU model and
whether the machine was shared (then absolute times are noisy; the ratios of one run are the
figures to read).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
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
from gift_quant.kernels.cpu import set_cpu_head  # noqa: E402
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
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - t0), (time.process_time() - c0) / steps


def ort_decode(dec: OrtDecoder, prompt: np.ndarray, steps: int) -> float:
    logits, past = dec(prompt)
    tok = logits[:, -1:].argmax(-1)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        logits, past = dec(tok.astype(np.int64), past)
        tok = logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - t0), (time.process_time() - c0) / steps


@torch.no_grad()
def torch_prefill(model, ids: torch.Tensor) -> float:
    return _timed(lambda: model(input_ids=ids, use_cache=False))


def set_backend(model, backend: Backend) -> None:
    """Every MixedLinear on ``backend``; the output Linear read from its fp16 copy on the CPU
    path (as ``load_quantized`` sets it up), a plain ``nn.Linear`` otherwise."""
    for m in model.modules():
        if isinstance(m, MixedLinear):
            m.backend = backend
    set_cpu_head(model, enabled=backend in (Backend.AUTO, Backend.CPU))


SESSION_MEMORY = """
import ctypes, sys
import onnxruntime as ort
def rss():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) * 1024
before = rss()
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
ctypes.CDLL("libc.so.6").malloc_trim(0)  # memory freed while loading back to the system
print(rss() - before)
"""


def session_bytes(onnx_dir: Path) -> int | None:
    """What an onnxruntime session of the model adds to a fresh process's resident memory
    (default session options; Linux only, else None), measured in a child process."""
    if not sys.platform.startswith("linux"):
        return None
    done = subprocess.run(
        [sys.executable, "-c", SESSION_MEMORY, str(onnx_dir / ONNX_FILE)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.split()[-1])


def bench_export(src: Path, args, fp32, windows) -> dict:
    bits = args.table_bits
    onnx_dir = Path(args.work) / (f"{src.name}-onnx" + ("" if bits == 16 else f"-t{bits}"))
    t0 = time.perf_counter()
    report = export_onnx(src, onnx_dir, table_bits=bits) if not onnx_dir.exists() else None
    export_s = time.perf_counter() - t0 if report else None
    dec = OrtDecoder(onnx_dir, torch.get_num_threads())
    model = load_quantized(src, dtype=torch.float32)
    row = {"export": src.name, "onnx_export_seconds": export_s, "onnx_table_bits": bits}
    row["bits"] = sorted({m.bits for m in model.modules() if isinstance(m, MixedLinear)})
    row["onnx_bytes"] = sum(
        f.stat().st_size for f in onnx_dir.iterdir() if f.name.startswith(ONNX_FILE)
    )
    row["onnx_session_bytes"] = session_bytes(onnx_dir)
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
    # fp16 tolerance: the difference is within fp16's rounding of the largest logit (2^-11 rel.)
    row["logits_within_fp16_tolerance"] = max_diff <= max_ref * 2.0**-11
    row["ppl_match_3_significant_digits"] = _sig3(row["ppl_onnxruntime"]) == _sig3(
        row["ppl_torch_loader"]
    )
    prompt = windows[0, :PROMPT].unsqueeze(0)
    long = windows.reshape(-1)[: args.prefill].unsqueeze(0)
    slow = max(4, args.decode // 8)  # the dequantize-every-call path: fewer decode steps

    def on(backend, fn):
        def run(*a):
            set_backend(model, backend)
            return fn(*a)

        return run

    paths = {  # name -> (decode, prefill)
        "fp32_torch": (
            lambda: torch_decode(fp32, prompt, args.decode),
            lambda: torch_prefill(fp32, long),
        ),
        "onnxruntime": (
            lambda: ort_decode(dec, prompt.numpy(), args.decode),
            lambda: _timed(lambda: dec(long.numpy())),
        ),
        "torch_cpu_path": (
            on(Backend.CPU, lambda: torch_decode(model, prompt, args.decode)),
            on(Backend.CPU, lambda: torch_prefill(model, long)),
        ),
        "torch_dequant_every_call": (
            on(Backend.TORCH, lambda: torch_decode(model, prompt, slow)),
            on(Backend.TORCH, lambda: torch_prefill(model, long)),
        ),
    }
    rounds: dict[str, list] = {name: [] for name in paths}
    for _ in range(args.repeats):  # in turn, so a change in the machine's load hits every path
        for name, (decode, prefill) in paths.items():
            tok_s, cpu_s = decode()
            rounds[name].append((tok_s, cpu_s, prefill()))
    speed = {}
    for name, rs in rounds.items():
        speed[name] = {
            "decode_tok_s": statistics.median(r[0] for r in rs),
            "decode_cpu_ms_per_token": statistics.median(r[1] for r in rs) * 1e3,
            "prefill_s": statistics.median(r[2] for r in rs),
            "rounds": [
                {"decode_tok_s": a, "decode_cpu_ms_per_token": b * 1e3, "prefill_s": c}
                for a, b, c in rs
            ],
        }
    base = speed["fp32_torch"]
    for v in speed.values():
        v["decode_vs_fp32"] = v["decode_tok_s"] / base["decode_tok_s"]
        v["decode_cpu_vs_fp32"] = base["decode_cpu_ms_per_token"] / v["decode_cpu_ms_per_token"]
        v["prefill_speedup_vs_fp32"] = base["prefill_s"] / v["prefill_s"]
    row["speed"] = speed
    return row


def _sig3(x: float) -> str:
    return f"{x:.3g}"


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
    p.add_argument(
        "--table-bits",
        type=int,
        choices=[16, 8],
        default=16,
        help="the ONNX exports' embedding and output matrix (8: not exact, so the two "
        "perplexities differ by its rounding)",
    )
    p.add_argument("--repeats", type=int, default=3, help="rounds of the four timed paths")
    p.add_argument(
        "--threads", type=int, help="torch and onnxruntime threads (default: torch's, the cores)"
    )
    p.add_argument("--out", default="benchmarks/results/edge_smollm2.json")
    add_arguments(p)
    args = p.parse_args()
    shared = shared_flag(p, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    from gift_quant.modeling import load_model
    from gift_quant.recipe import ModelConfig

    fp32, tok = load_model(ModelConfig())
    fp32 = fp32.float().eval()
    tokens = tokenize_documents(tok, load_documents("wiki-heldout"))
    windows = eval_windows(tokens, 512, args.ppl_tokens)
    rows = [bench_export(src, args, fp32, windows) for src in args.exports]
    env = environment(shared)
    result = {
        "setup": (
            f"SmolLM2-135M-Instruct exports; perplexity on {windows.shape[0]} x 512 held-out "
            f"wiki tokens; decode: {PROMPT}-token prompt + {args.decode} greedy tokens at "
            f"batch 1 ({max(4, args.decode // 8)} for the dequantize-every-call path); "
            f"prefill {args.prefill} tokens; {env['threads']} threads; median of "
            f"{args.repeats} rounds of the four paths in turn"
        ),
        "rows": [stamp(dict(r), env) for r in rows],
    }
    write_json(args.out, result)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    hdr = (
        f"{'export':10s} {'path':26s} {'decode tok/s':>12s} {'x fp32':>7s} "
        f"{'cpu ms/tok':>10s} {'x fp32':>7s} {'prefill s':>9s} {'x fp32':>7s}"
    )
    print(hdr)
    for r in rows:
        for name, v in r["speed"].items():
            print(
                f"{r['export']:10s} {name:26s} {v['decode_tok_s']:12.2f} "
                f"{v['decode_vs_fp32']:7.2f} {v['decode_cpu_ms_per_token']:10.1f} "
                f"{v['decode_cpu_vs_fp32']:7.2f} {v['prefill_s']:9.2f} "
                f"{v['prefill_speedup_vs_fp32']:7.2f}"
            )
        match = "match" if r["ppl_match_3_significant_digits"] else "DIFFER"
        print(
            f"{r['export']:10s} bits {r['bits']}; ppl ort {r['ppl_onnxruntime']:.4f} torch "
            f"{r['ppl_torch_loader']:.4f} ({match} to 3 significant digits, "
            f"{r['ppl_tokens']} tokens); logits max diff {r['logits_max_abs_diff']:.2e} "
            f"(max |logit| {r['logits_max_abs']:.1f}, within fp16 tolerance: "
            f"{r['logits_within_fp16_tolerance']}); onnx {r['onnx_bytes'] / 2**20:.1f} MiB"
            + (
                f", session {r['onnx_session_bytes'] / 2**20:.0f} MiB resident"
                if r.get("onnx_session_bytes") is not None
                else ""
            )
        )


if __name__ == "__main__":
    main()
