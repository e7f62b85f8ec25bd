"""Command line: ``python -m gift_quant {quantize,eval,...}``. The only module that prints.

With ``--json`` every command prints its result as one JSON object on the last stdout line;
progress bars and logs go to stderr. Every expected failure (bad recipe, data, model or files,
a full disk) is one ``error:`` line naming the fix and exit code 2; Ctrl-C is one line and exit
code 130; ``--debug`` adds the traceback. Importing this module imports neither torch nor
transformers, so ``--help`` and recipe errors are quick.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
import time
import traceback
from pathlib import Path

from gift_quant.files import check_new_out

log = logging.getLogger("gift_quant")


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", help="model directory, .gguf file or hub id (default: embedded SmolLM2)"
    )
    p.add_argument(
        "--recipe",
        help="recipe name (recipes/*.yaml) or YAML file; default: quickstart (w3 g64 + 3%% "
        "salient columns, sized for the embedded model), or for quantize --model M the "
        "built-in defaults (w4 g128)",
    )
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
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _model_dir_arg(p: argparse.ArgumentParser, help_text: str, optional: bool = False) -> None:
    p.add_argument("dir", nargs="?" if optional else None, help=help_text)
    p.add_argument(
        "--no-verify", action="store_true", help="skip the SHA-256 check of the files (faster)"
    )


MODEL_DIR = (
    "model directory: an export, a recover output directory (its final model) or a "
    "gptq+lora export (its adapter is applied)"
)


def _at_least(least: int):
    """argparse type: an integer >= least."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value

    return parse


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
    r.add_argument(
        "--out",
        default="runs/recover",
        help="output directory (default: runs/recover); rerunning the same command resumes it",
    )
    _common(r)

    e = sub.add_parser("eval", help="perplexity of a model directory or an FP model")
    _model_dir_arg(e, MODEL_DIR, optional=True)
    e.add_argument("--model", help="evaluate an unquantized model instead (dir, .gguf or hub id)")
    e.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="SOURCE",
        help="text to score: wiki-heldout (default), a .txt/.jsonl file or hf:NAME; repeat "
        "--text for several",
    )
    e.add_argument(
        "--seq-len", type=_at_least(2), help="window length (default from the recipe: 512)"
    )
    e.add_argument(
        "--max-tokens",
        type=_at_least(0),
        help="evaluate at most this many tokens per text (0: all; at least one window)",
    )
    e.add_argument("--batch-size", type=_at_least(1), help="windows per forward pass")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    e.add_argument(
        "--tasks",
        help="also zero-shot lm-eval tasks, comma-separated: wiki_cloze (local, offline) or "
        "any lm-eval task with a network (hellaswag,arc_easy,piqa,winogrande); [eval] extra",
    )
    _common(e)

    x = sub.add_parser("export", help="re-export a model directory in another view")
    _model_dir_arg(x, MODEL_DIR + ", or a plain GPTQ checkpoint")
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
    _model_dir_arg(i, MODEL_DIR + ", or a plain GPTQ checkpoint")
    _common(i)
    return parser


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("gift_quant").setLevel(logging.WARNING if quiet else logging.INFO)
    # Import-time notices of optional third-party pieces (torchao's missing GPU extensions,
    # torch's pytree deprecation of its enum registrations) say nothing about this run.
    for name in ("torchao", "torch.utils._pytree"):  # a filter: torch resets their levels
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ErrorsOnly) for f in logger.filters):
            logger.addFilter(_ErrorsOnly())
    if quiet:  # transformers' and the hub's bars ("Loading weights") follow -q too
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:  # read its setting once, at import: set it now
        from huggingface_hub import utils as hub_utils

        (hub_utils.disable_progress_bars if quiet else hub_utils.enable_progress_bars)()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        (hf_logging.disable_progress_bar if quiet else hf_logging.enable_progress_bar)()


def _load_recipe(args, default: str | None = None):
    from gift_quant.recipe import find_recipe, load_recipe

    overrides = list(args.overrides)
    if args.model:
        overrides.insert(0, f"model.name_or_path={json.dumps(args.model)}")
    name = args.recipe or default
    return load_recipe(find_recipe(name) if name else None, overrides)


def _next_commands(model_dir: str) -> list[str]:
    return [
        f"python -m gift_quant eval {model_dir}",
        f"python -m gift_quant inspect {model_dir}",
        f"python -m gift_quant export {model_dir} --format gptq+lora --out {model_dir}-engine",
    ]


def cmd_quantize(args) -> dict:
    # before importing torch: instant errors. Without --model, the recipe sized for the embedded
    # model; with one, the built-in defaults (w4 g128, 128 windows of 2048 tokens)
    recipe = _load_recipe(args, default=None if args.model else "quickstart")
    out = Path(args.out)
    check_new_out(out)

    from gift_quant.data import check_sources
    from gift_quant.evaluate import bits_report
    from gift_quant.io.export import save_quantized
    from gift_quant.modeling import load_model
    from gift_quant.quantize import quantize_model
    from gift_quant.validation import check_finite_weights, validate

    validate(recipe, out, new_out=True)
    check_sources(recipe, stages=("calib",))
    t0 = time.perf_counter()
    model, tok = load_model(recipe.model)
    check_finite_weights(model, recipe.model.name_or_path or "the embedded model")
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
    result["model_dir"] = str(out)
    result["next"] = _next_commands(str(out))
    return result


def cmd_recover(args) -> dict:
    recipe = _load_recipe(args, default="quickstart")  # before importing torch

    from gift_quant.pipeline import recover
    from gift_quant.run_report import report_table

    report = recover(recipe, args.out, progress=not args.quiet)
    if report is None:
        return None  # ranks > 0 of a multi-process run print nothing
    report = {**report, "next": _next_commands(args.out)}
    if not args.json:
        print(report_table(report))
        print(f"\nmodel: {report['model_dir']}")
        print("next:\n  " + "\n  ".join(report["next"]))
    return report


def _lora_run(root: Path) -> bool:
    """A train.method=lora recover run: its model is quantized/ plus the adapter."""
    return (root / "recipe.yaml").is_file() and (root / "lora_adapter").is_dir()


def _model_files(path: str) -> Path:
    """The export directory of any model directory: its weights, config, tokenizer and recipe
    (a LoRA recover run: quantized/)."""
    from gift_quant.io.load import resolve_model_dir

    root = Path(path)
    return root / "quantized" if _lora_run(root) else resolve_model_dir(root)


def _load_model_dir(path: str, files: Path, device, verify: bool):
    """The model of a model directory (``files``: its :func:`_model_files`); a LoRA recover
    run gets its adapter applied on the quantized start."""
    from gift_quant.io.load import load_quantized

    model = load_quantized(files, device=device, verify=verify)
    if _lora_run(Path(path)):
        from gift_quant.train.lora import load_lora

        model = load_lora(model, Path(path) / "lora_adapter")
    return model


def cmd_eval(args) -> dict:
    import torch

    from gift_quant.data import load_eval_windows
    from gift_quant.evaluate import perplexity
    from gift_quant.modeling import check_context, load_model, resolve_device
    from gift_quant.recipe import EvalConfig, ModelConfig, check_windows, load_recipe
    from gift_quant.validation import check_device

    if bool(args.dir) == bool(args.model):
        raise ValueError("give a model directory or --model, not both and not neither")
    check_device(args.device, "--device")
    if args.tasks is not None:
        from gift_quant.lm_eval import check_tasks

        check_tasks(args.tasks.split(","))  # unknown task / no lm-eval: before any loading
    recipe_eval = EvalConfig()
    files = _model_files(args.dir) if args.dir else None
    if files is not None and (files / "recipe.yaml").is_file():  # the run's settings
        recipe_eval = load_recipe(files / "recipe.yaml").eval
    seq_len = recipe_eval.seq_len if args.seq_len is None else args.seq_len
    max_tokens = recipe_eval.max_tokens if args.max_tokens is None else args.max_tokens
    # the context from config.json, before loading the weights (a --model directory too)
    config_dir = files if files is not None else Path(args.model)
    try:
        has_config = (config_dir / "config.json").is_file()
    except OSError:  # a name too long for a path, a directory it may not read: the loader's
        has_config = False
    if has_config:
        try:
            config = json.loads((config_dir / "config.json").read_text())
        except (OSError, ValueError):
            config = None  # the loader names what is wrong with it
        if isinstance(config, dict):
            run_key = args.seq_len is None and files is not None  # the run's recipe set it
            key = "eval.seq_len" if run_key else "--seq-len"
            check_context(config, seq_len, key)
    cap = "--max-tokens"
    if args.max_tokens is None and files is not None:  # the run's own cap
        cap = f"eval.max_tokens of {files / 'recipe.yaml'} (--max-tokens overrides it)"
    check_windows("--seq-len", seq_len, cap, max_tokens)
    device = resolve_device(args.device)
    if args.dir:
        from transformers import AutoTokenizer

        model = _load_model_dir(args.dir, files, device, not args.no_verify)
        tok = AutoTokenizer.from_pretrained(files)
        name = args.dir
    else:
        model, tok = load_model(ModelConfig(name_or_path=args.model))
        name = args.model
    texts = args.text or list(recipe_eval.text)
    dtype = getattr(torch, args.dtype or recipe_eval.dtype)
    check_context(model, seq_len, "--seq-len")
    results = []
    for text in texts:
        windows = load_eval_windows(tok, text, seq_len, max_tokens, recipe_eval.bos)
        r = perplexity(
            model,
            windows,
            batch_size=recipe_eval.batch_size if args.batch_size is None else args.batch_size,
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
    report.json (next to perplexity), through a temp file renamed over it. An export is left
    as it is: its files are checksummed in its manifest.json, and a changed report.json would
    make the next load refuse it as corrupt."""
    from gift_quant.io.load import is_recover_run
    from gift_quant.lm_eval import run_tasks

    results = run_tasks(model.to(dtype), tok, args.tasks.split(","), progress=not args.quiet)
    for task, metrics in results.items():
        log.info("%s: %s", task, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    report = Path(args.dir or "") / "report.json"
    if args.dir and is_recover_run(Path(args.dir)) and report.is_file():
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
    from gift_quant.io.load import load_quantized, resolve_model_dir

    out = Path(args.out)
    check_new_out(out)
    if args.format == "onnx":
        from gift_quant.io.onnx import export_onnx

        report = export_onnx(resolve_model_dir(args.dir), out, verify=not args.no_verify)
        log.info("%s: %s", out, report["note"])
        return {"command": "export", "out": str(out), **report}
    model_dir = resolve_model_dir(args.dir)
    model = load_quantized(model_dir, verify=not args.no_verify)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        tok = None
    if args.format == "gptq+lora":
        save_gptq_lora(model, out, tokenizer=tok, checkpoint_format=args.checkpoint_format)
    else:  # the run's recipe and report go along (eval reads its window length there)
        from gift_quant.recipe import load_recipe

        recipe_file, report_file = model_dir / "recipe.yaml", model_dir / "report.json"
        save_quantized(
            model,
            out,
            tokenizer=tok,
            recipe=load_recipe(recipe_file) if recipe_file.is_file() else None,
            report=json.loads(report_file.read_text()) if report_file.is_file() else None,
            checkpoint_format=args.checkpoint_format,
        )
    return {"command": "export", "format": args.format, "out": str(out)}


def _natural(name: str) -> list:
    """Sort key: layer 2 before layer 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def cmd_inspect(args) -> dict:
    from gift_quant.evaluate import bits_report
    from gift_quant.io.load import inspect_checkpoint, load_quantized

    info = inspect_checkpoint(args.dir)
    t0 = time.perf_counter()
    model = load_quantized(info.path, verify=not args.no_verify)
    load_seconds = time.perf_counter() - t0
    layers = []
    for name in sorted(info.modules, key=_natural):
        layer = model.get_submodule(name)
        n_weights = layer.in_features * layer.out_features
        layers.append(
            {
                "name": name,
                "shape": [layer.out_features, layer.in_features],
                "bits": layer.bits,
                "group_size": layer.group_size,
                "num_salient": layer.num_salient,
                "bits_per_weight": round(layer.storage_bits() / n_weights, 4),
            }
        )
    bits = bits_report(model)
    # the FP16 model: quantized weights at 2 bytes, every other tensor as stored (this is
    # what recover's report.json calls bytes_fp16)
    fp16_bytes = bits["model_bytes"] - bits["quantized_bytes"] + 2 * bits["quantized_weights"]
    files = {
        f.relative_to(info.path).as_posix(): f.stat().st_size
        for f in sorted(info.path.rglob("*"))
        if f.is_file()
    }
    disk = sum(v for k, v in files.items() if k.endswith(".safetensors"))
    result = {
        "command": "inspect",
        "dir": str(info.path),
        "kind": info.kind,
        "checkpoint_format": info.checkpoint_format,
        "num_layers": len(layers),
        "bits_per_weight": round(bits["bits_per_weight"], 4),
        "weights_bytes_on_disk": disk,
        "fp16_bytes": fp16_bytes,
        "compression": round(fp16_bytes / max(disk, 1), 3),
        "load_seconds": round(load_seconds, 3),
        "files": files,
        "layers": layers,
    }
    if info.adapter is not None:
        result["adapter"] = (
            f"salient_lora/: PEFT LoRA r={info.adapter['r']} on {len(info.modules)} GPTQ "
            f"layers, one-hot lora_A = salient columns (applied: k below counts them)"
        )
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


def _interrupted(args) -> str:
    """What a rerun of an interrupted command does."""
    if args.command != "recover":
        return "interrupted; nothing partial was kept, rerun the same command"
    checkpoints = Path(args.out) / "train" / "checkpoints"
    done = sorted(p for p in checkpoints.glob("step-*") if (p / "state.json").is_file())
    if done:
        step = int(done[-1].name.split("-")[1])
        return f"interrupted; rerun the same command to resume from step {step}"
    return "interrupted; rerun the same command to resume (finished stages are kept)"


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return (
            f"no space left on the device{where}; nothing partial was kept, free some space "
            f"and rerun the same command"
        )
    text = " ".join(str(exc).split()) or type(exc).__name__
    if type(exc).__name__ == "SafetensorError":
        return f"a safetensors file cannot be read ({text}): the model's files are damaged"
    return text


EXPECTED = (ValueError, OSError)  # RecipeError, CheckpointError, missing files, full disk, hub


def _expected() -> tuple[type[BaseException], ...]:
    """EXPECTED, and safetensors' error (a truncated file) once safetensors is imported (this
    module does not import it: --help and recipe errors stay quick)."""
    st = sys.modules.get("safetensors")
    return EXPECTED if st is None else (*EXPECTED, st.SafetensorError)


def _plain_lines(result: dict) -> list[str]:
    """A command's result for people: its plain values, then eval's perplexity per text and
    zero-shot metrics per task (so that -q, which silences the log, still shows them)."""
    lines = [f"{k}: {v}" for k, v in result.items() if not isinstance(v, list | dict)]
    if result.get("command") == "eval":
        for r in result["results"]:
            lines.append(f"{r['text']}: perplexity {r['perplexity']:.3f} over {r['tokens']} tokens")
        for task, metrics in result.get("zero_shot", {}).items():
            lines.append(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(_interrupted(args), file=sys.stderr)
        return 130
    except _expected() as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {_error_line(exc)}", file=sys.stderr)
        return 2
    if result is None:
        return 0
    if args.json:
        print(json.dumps(result))
    elif args.command != "recover":
        for line in _plain_lines(result):
            print(line)
        if "next" in result:
            print("next:\n  " + "\n  ".join(result["next"]))
    return 0
