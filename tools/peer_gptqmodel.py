"""Quantize a model with gptqmodel (the maintained GPTQ peer) on given calibration windows.

Runs in its own process so its timing and memory are its own. Needs the [gptq] extra.

    python tools/peer_gptqmodel.py --model DIR --windows calib.safetensors --bits 3 \
        --group-size 64 --out OUT [--asym] [--dtype bfloat16]

``--windows`` is a safetensors file with one int64 tensor ``input_ids`` [n, L] (what
tools/bench_quality.py writes). Prints one JSON line: seconds of ``quantize()`` alone and
of load + quantize + save. The output directory is a GPTQ v1 checkpoint that
``gift_quant.load_quantized`` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel bug on 2-core machines
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--windows", required=True)
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--asym", action="store_true")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from safetensors.torch import load_file

    ids = load_file(args.windows)["input_ids"]
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    t0 = time.perf_counter()
    cfg = QuantizeConfig(
        bits=args.bits, group_size=args.group_size, sym=not args.asym, desc_act=False
    )
    model = GPTQModel.load(args.model, cfg, device="cpu", dtype=getattr(torch, args.dtype))
    t1 = time.perf_counter()
    model.quantize(calibration, batch_size=args.batch_size)
    t2 = time.perf_counter()
    model.save(args.out)
    t3 = time.perf_counter()
    print(
        json.dumps(
            {
                "peer": "gptqmodel",
                "version": __import__("gptqmodel").__version__,
                "bits": args.bits,
                "group_size": args.group_size,
                "sym": not args.asym,
                "dtype": args.dtype,
                "act_group_aware": bool(getattr(cfg, "act_group_aware", False)),
                "damp_percent": float(getattr(cfg, "damp_percent", float("nan"))),
                "seconds_quantize": t2 - t1,
                "seconds_total": t3 - t0,
                "out": args.out,
            }
        )
    )


if __name__ == "__main__":
    main()
