"""Command line: ``python -m gift_quant {quantize,eval,...}``. The only module that prints.

With ``--json`` every command prints its result as one JSON object on the last stdout line;
progress bars and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("gift_quant")


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", help="model directory, .gguf file or hub id (default: embedded SmolLM2)"
    )
    p.add_argument("--recipe", help="recipe YAML (recipes/*.yaml); default: the built-in defaults")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe value, e.g. --set quant.bits=3 (repeatable)",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gift_quant",
        description="Quantization recovery: GPTQ/RTN + FP16 salient columns, GIFT-SW, export.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate, pick salient columns, quantize, export")
    _recipe_args(q)
    q.add_argument("--out", required=True, help="export directory to create (must not exist)")
    _common(q)

    r = sub.add_parser(
        "recover", help="quantize, GIFT-SW fine-tune, export, evaluate (the main job)"
    )
    _recipe_args(r)
    r.add_argument("--out", default="runs/recover", help="output directory (a rerun resumes it)")
    _common(r)

    e = sub.add_parser("eval", help="perplexity of an export directory or an FP model")
    e.add_argument("dir", nargs="?", help="export directory written by quantize/recover")
    e.add_argument("--model", help="evaluate an unquantized model instead (dir, .gguf or hub id)")
    e.add_argument(
        "--text", action="append", default=[], help="text source(s); default wiki-heldout"
    )
    e.add_argument("--seq-len", type=int, help="window length (default from the recipe: 512)")
    e.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens per text")
    e.add_argument("--batch-size", type=int, help="windows per forward pass")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    e.add_argument(
        "--tasks",
        help="also zero-shot lm-eval tasks, comma-separated: wiki_cloze (local, offline) or "
        "any lm-eval task with a network (hellaswag,arc_easy,piqa,winogrande); [eval] extra",
    )
    _common(e)

    x = sub.add_parser("export", help="re-export an export directory in another view")
    x.add_argument("dir", help="export directory (or a plain GPTQ checkpoint)")
    x.add_argument(
        "--format",
        choices=["mixed", "gptq+lora", "onnx"],
        default="gptq+lora",
        help="mixed: gift_quant format; gptq+lora: plain GPTQ checkpoint + PEFT adapter "
        "(engines); onnx: onnxruntime MatMulNBits model with a KV cache (CPU, [onnx] extra)",
    )
    x.add_argument("--checkpoint-format", choices=["auto", "gptq", "gptq_v2"], default="auto")
    x.add_argument("--out", required=True, help="directory to create (must not exist)")
    _common(x)

    i = sub.add_parser("inspect", help="per-layer bits, salient columns, sizes and load time")
    i.add_argument("dir", help="export directory (or a plain GPTQ checkpoint)")
    _common(i)
    return parser


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _load_recipe(args, default: str | None = None):
    from gift_quant.recipe import find_recipe, load_recipe

    overrides = list(args.overrides)
    if args.model:
        overrides.insert(0, f"model.name_or_path={json.dumps(args.model)}")
    name = args.recipe or default
    return load_recipe(find_recipe(name) if name else None, overrides)


def cmd_quantize(args) -> dict:
    from gift_quant.evaluate import bits_report
    from gift_quant.io.export import save_quantized
    from gift_quant.modeling import load_model
    from gift_quant.quantize import quantize_model

    recipe = _load_recipe(args)
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(
            f"{out} already exists; choose a new --out directory or remove it first"
        )
    t0 = time.perf_counter()
    model, tok = load_model(recipe.model)
    log.info(
        "loaded %s in %.1fs",
        recipe.model.name_or_path or "SmolLM2-135M-Instruct (embedded)",
        time.perf_counter() - t0,
    )
    report = quantize_model(model, tok, recipe, progress=not args.quiet)
    result = {
        "command": "quantize",
        "out": str(out),
        "model": recipe.model.name_or_path or "embedded:SmolLM2-135M-Instruct",
        **{k: v for k, v in report.to_dict().items() if k != "layers"},
        **bits_report(model),
    }
    save_quantized(
        model,
        out,
        tokenizer=tok,
        recipe=recipe,
        report={**result, "layers": report.to_dict()["layers"]},
        checkpoint_format=recipe.export.checkpoint_format,
    )
    result["seconds_wall"] = time.perf_counter() - t0
    return result


def cmd_recover(args) -> dict:
    from gift_quant.pipeline import recover, report_table

    recipe = _load_recipe(args, default="quickstart")
    report = recover(recipe, args.out, progress=not args.quiet)
    if report is not None and not args.json:
        print(report_table(report))
    return report  # None on ranks > 0 of a multi-process run: they print nothing


def cmd_eval(args) -> dict:
    import torch

    from gift_quant.data import eval_windows, load_documents, tokenize_documents
    from gift_quant.evaluate import perplexity
    from gift_quant.io.load import load_quantized
    from gift_quant.modeling import check_context, load_model, resolve_device
    from gift_quant.recipe import EvalConfig, ModelConfig, load_recipe

    if bool(args.dir) == bool(args.model):
        raise ValueError("give an export directory or --model, not both and not neither")
    if args.tasks is not None:
        from gift_quant.lm_eval import check_tasks

        check_tasks(args.tasks.split(","))  # unknown task / no lm-eval: before any loading
    defaults = EvalConfig()
    recipe_eval = defaults
    device = resolve_device(args.device)
    if args.dir:
        from transformers import AutoTokenizer

        from gift_quant.pipeline import final_model_dir

        model_dir = final_model_dir(Path(args.dir))  # a recover output dir holds it in model/
        model = load_quantized(model_dir, device=device)
        tok = AutoTokenizer.from_pretrained(model_dir)
        recipe_file = model_dir / "recipe.yaml"
        if recipe_file.is_file():
            recipe_eval = load_recipe(recipe_file).eval
        name = args.dir
    else:
        model, tok = load_model(ModelConfig(name_or_path=args.model))
        name = args.model
    texts = args.text or list(recipe_eval.text)
    seq_len = args.seq_len or recipe_eval.seq_len
    max_tokens = recipe_eval.max_tokens if args.max_tokens is None else args.max_tokens
    dtype = getattr(torch, args.dtype or recipe_eval.dtype)
    check_context(model, seq_len, "--seq-len")
    results = []
    for text in texts:
        windows = eval_windows(tokenize_documents(tok, load_documents(text)), seq_len, max_tokens)
        r = perplexity(
            model,
            windows,
            batch_size=args.batch_size or recipe_eval.batch_size,
            device=device,
            dtype=dtype,
            progress=not args.quiet,
            desc=f"ppl {text}",
        )
        log.info(
            "%s on %s: perplexity %.3f over %d tokens", name, text, r["perplexity"], r["tokens"]
        )
        results.append({"text": text, **r})
    out = {"command": "eval", "model": name, "seq_len": seq_len, "results": results}
    if len(results) == 1:
        out.update({k: results[0][k] for k in ("perplexity", "tokens")})
    if args.tasks is not None:
        out["zero_shot"] = _zero_shot(args, model, tok, dtype)
    return out


def _zero_shot(args, model, tok, dtype) -> dict:
    """lm-eval accuracy of ``model``; for a recover directory also written to its
    report.json (next to perplexity), through a temp file renamed over it."""
    from gift_quant.lm_eval import run_tasks

    results = run_tasks(model.to(dtype), tok, args.tasks.split(","))
    for task, metrics in results.items():
        log.info("%s: %s", task, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    report = Path(args.dir or "") / "report.json"
    if args.dir and report.is_file():
        data = json.loads(report.read_text())
        data["zero_shot"] = {**data.get("zero_shot", {}), **results}
        tmp = report.with_name(f".report.json.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, report)
    return results


def cmd_export(args) -> dict:
    from transformers import AutoTokenizer

    from gift_quant.io.export import save_quantized
    from gift_quant.io.gptq_lora import save_gptq_lora
    from gift_quant.io.load import load_quantized

    out = Path(args.out)
    if out.exists():
        raise FileExistsError(
            f"{out} already exists; choose a new --out directory or remove it first"
        )
    if args.format == "onnx":
        from gift_quant.io.onnx import export_onnx

        report = export_onnx(args.dir, out)
        log.info("%s: %s", out, report["note"])
        return {"command": "export", "out": str(out), **report}
    model = load_quantized(args.dir)
    try:
        tok = AutoTokenizer.from_pretrained(args.dir)
    except (OSError, ValueError):
        tok = None
    if args.format == "gptq+lora":
        save_gptq_lora(model, out, tokenizer=tok, checkpoint_format=args.checkpoint_format)
    else:
        save_quantized(model, out, tokenizer=tok, checkpoint_format=args.checkpoint_format)
    return {"command": "export", "format": args.format, "out": str(out)}


def cmd_inspect(args) -> dict:
    from gift_quant.io.load import inspect_checkpoint, load_quantized

    info = inspect_checkpoint(args.dir)
    t0 = time.perf_counter()
    model = load_quantized(args.dir)
    load_seconds = time.perf_counter() - t0
    layers = []
    for name in info.modules:
        layer = model.get_submodule(name)
        n_weights = layer.in_features * layer.out_features
        layers.append(
            {
                "name": name,
                "shape": [layer.out_features, layer.in_features],
                "bits": layer.bits,
                "group_size": layer.group_size,
                "num_salient": layer.num_salient,
                "bits_per_weight": layer.storage_bits() / n_weights,
            }
        )
    q_bits = sum(model.get_submodule(n).storage_bits() for n in info.modules)
    q_weights = sum(x["shape"][0] * x["shape"][1] for x in layers)
    n_params = q_weights + sum(p.numel() for n, p in model.named_parameters())
    files = {f.name: f.stat().st_size for f in sorted(info.path.iterdir()) if f.is_file()}
    disk = sum(v for k, v in files.items() if k.endswith(".safetensors"))
    result = {
        "command": "inspect",
        "dir": str(info.path),
        "kind": info.kind,
        "checkpoint_format": info.checkpoint_format,
        "num_layers": len(layers),
        "bits_per_weight": q_bits / max(q_weights, 1),
        "weights_bytes_on_disk": disk,
        "fp16_bytes": 2 * n_params,
        "compression": 2 * n_params / max(disk, 1),
        "load_seconds": load_seconds,
        "files": files,
        "layers": layers,
    }
    if not args.json:
        print(f"{'layer':48s} {'shape':>12s} {'bits':>4s} {'group':>5s} {'k':>4s} {'bits/w':>7s}")
        for x in layers:
            shape = "x".join(map(str, x["shape"]))
            print(
                f"{x['name']:48s} {shape:>12s} {x['bits']:4d} {x['group_size']:5d} "
                f"{x['num_salient']:4d} {x['bits_per_weight']:7.3f}"
            )
    return result


COMMANDS = {
    "quantize": cmd_quantize,
    "recover": cmd_recover,
    "eval": cmd_eval,
    "export": cmd_export,
    "inspect": cmd_inspect,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result is None:
        return 0
    if args.json:
        print(json.dumps(result))
    elif args.command != "recover":
        for key, value in result.items():
            if not isinstance(value, list | dict):
                print(f"{key}: {value}")
    return 0
