"""Export round trip on the real SmolLM2: the loaded export computes what the in-memory
quantized model computes.

    python tools/check_roundtrip.py [--settings w4g64 w3g64] [--method gptq]

For each setting (3% salient columns, `gift` metric): quantize in memory, export, load back
(gift_quant.load_quantized and AutoModelForCausalLM.from_pretrained after `import gift_quant`),
and compare logits on held-out text (fp32 compute on the CPU) and held-out perplexity
(40 x 512 tokens); then generate() from the export directory alone, and report sizes and load
time. Calibration is 32 windows of 512 tokens by default (`--calib-samples`): what is checked
is the export, not the quantization quality. Writes benchmarks/results/roundtrip_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import gift_quant  # noqa: F401  (registers the transformers quantizer)
from gift_quant.data import eval_windows, load_documents, tokenize_documents
from gift_quant.evaluate import perplexity
from gift_quant.io.export import save_quantized
from gift_quant.io.load import load_quantized
from gift_quant.modeling import cast_params, load_model
from gift_quant.quantize import quantize_model
from gift_quant.recipe import load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import add_arguments, provenance, shared_flag, stamp, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["w4g64", "w3g64"])
    p.add_argument("--method", default="gptq")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows of 512")
    p.add_argument("--work", default=None, help="where the exports go (default: a temp dir)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/roundtrip_smollm2.json"))
    add_arguments(p)
    args = p.parse_args()
    prov = provenance(shared_flag(p, args))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results = {}
    work = Path(args.work or tempfile.mkdtemp(prefix="roundtrip-"))
    work.mkdir(parents=True, exist_ok=True)
    for setting in args.settings:
        bits, group = int(setting[1]), int(setting.split("g")[1])
        recipe = load_recipe(
            None,
            [
                f"quant.method={args.method}",
                f"quant.bits={bits}",
                f"quant.group_size={group}",
                "saliency.metric=gift",  # the metric the README's table was measured with
                "saliency.fraction=0.03",
                f"calib.num_samples={args.calib_samples}",
                "calib.seq_len=512",
            ],
        )
        model, tok = load_model(recipe.model)
        windows = eval_windows(
            tokenize_documents(tok, load_documents("wiki-heldout")), 512, 40 * 512
        )
        quantize_model(model, tok, recipe)
        out = save_quantized(model, work / setting, tokenizer=tok, recipe=recipe)
        t0 = time.perf_counter()
        loaded = load_quantized(out, dtype=torch.float32)
        load_seconds = time.perf_counter() - t0
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        ids = windows[:4]
        with torch.no_grad():
            ref = cast_params(model, torch.float32)(ids).logits
            got = loaded(ids).logits
            got_hf = hf(ids).logits
        scale = float(ref.abs().max())
        ppl_mem = perplexity(model, windows, batch_size=8, desc="in memory")
        ppl_load = perplexity(loaded, windows, batch_size=8, desc="loaded")
        tok2 = AutoTokenizer.from_pretrained(out)
        prompt = tok2("The history of the city", return_tensors="pt").input_ids
        text = tok2.decode(loaded.generate(prompt, max_new_tokens=12, do_sample=False)[0])
        files = {f.name: f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors"}
        results[setting] = {
            "max_abs_logit_diff_load_quantized": float((got - ref).abs().max()),
            "max_abs_logit_diff_from_pretrained": float((got_hf - ref).abs().max()),
            "max_abs_logit": scale,
            "perplexity_in_memory": ppl_mem["perplexity"],
            "perplexity_loaded": ppl_load["perplexity"],
            "tokens": ppl_load["tokens"],
            "generated": text,
            "safetensors_bytes": files,
            "load_seconds": load_seconds,
        }
        stamp(results[setting], prov)
        print(setting, json.dumps(results[setting]), flush=True)
    write_json(args.out, results)
    print(
        f"\n{'setting':8s} {'max|dlogit|/max|logit|':>24s} {'ppl memory':>11s} {'ppl loaded':>11s}"
    )
    for s, r in results.items():
        rel = max(r["max_abs_logit_diff_load_quantized"], r["max_abs_logit_diff_from_pretrained"])
        print(
            f"{s:8s} {rel / r['max_abs_logit']:24.2e} {r['perplexity_in_memory']:11.4f} "
            f"{r['perplexity_loaded']:11.4f}"
        )


if __name__ == "__main__":
    main()
