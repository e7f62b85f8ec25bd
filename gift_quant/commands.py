"""The commands behind ``python -m gift_quant``: each takes the parsed arguments and returns
its result as a dict, which ``cli`` prints (recover's report table and inspect's layer table
are printed here, unless --json); ``cli`` also turns failures into one ``error:`` line.
Torch, transformers and the pipeline are imported inside each command, so that importing
this module stays quick."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from gift_quant.files import check_new_out

log = logging.getLogger("gift_quant")


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
    from gift_quant.io.checkpoint import resolve_model_dir

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
    from gift_quant.modeling import check_context, check_context_file, load_model, resolve_device
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
    # the context from config.json before the weights load (a --model directory too)
    run_key = args.seq_len is None and files is not None  # the run's recipe set the window
    key = "eval.seq_len" if run_key else "--seq-len"
    check_context_file(files if files is not None else Path(args.model), seq_len, key)
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
    from gift_quant.io.checkpoint import is_recover_run
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

    from gift_quant.io.checkpoint import inspect_checkpoint, resolve_model_dir, tensor_bytes
    from gift_quant.io.export import save_quantized
    from gift_quant.io.gptq_lora import save_gptq_lora
    from gift_quant.io.load import load_quantized
    from gift_quant.validation import check_space

    out = Path(args.out)
    if args.table_bits is not None and args.format != "onnx":
        raise ValueError(
            f"--table-bits applies to --format onnx, not {args.format}; drop it or export "
            f"with --format onnx"
        )
    check_new_out(out)
    if args.format == "onnx":
        from gift_quant.io.onnx import export_onnx

        report = export_onnx(
            resolve_model_dir(args.dir),
            out,
            verify=not args.no_verify,
            table_bits=args.table_bits or 16,
        )
        log.info("%s: %s", out, report["note"])
        return {"command": "export", "out": str(out), **report}
    model_dir = resolve_model_dir(args.dir)
    # what either format writes again: the GPTQ and other weights (the mixed copy, all of it)
    info = inspect_checkpoint(model_dir)
    check_space(out, {"export": tensor_bytes(info, salient=args.format == "mixed")})
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
    from gift_quant.io.checkpoint import inspect_checkpoint
    from gift_quant.io.load import load_quantized

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
