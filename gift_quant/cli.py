"""Command line: ``python -m gift_quant {quantize,eval,...}``: the arguments, logging, the
result's printing and the one-line errors; the commands themselves are in ``commands``.

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
import sys
import traceback
from pathlib import Path

from gift_quant.commands import COMMANDS

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
    x.add_argument(
        "--checkpoint-format",
        choices=["auto", "gptq", "gptq_v2"],
        default="auto",
        help="GPTQ zero-point convention: gptq (v1, z - 1; symmetric grids), gptq_v2 (z as "
        "is), auto (v1 where every layer is symmetric, else v2)",
    )
    x.add_argument(
        "--table-bits",
        type=int,
        choices=[16, 8],
        default=None,
        help="onnx only: the token embedding and output matrix in fp16 (16, exact; default) or "
        "as 8-bit codes per block of 32 (8: a quarter of fp32's memory, not exact)",
    )
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
