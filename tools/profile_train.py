"""Where a training step's time goes: a few GIFT-SW steps on an export under torch.profiler.

    python tools/profile_train.py EXPORT_DIR --text FILE [--steps 3] [--batch 8] [--seq 512]
    torchrun --standalone --nproc_per_node 2 tools/profile_train.py EXPORT_DIR --text FILE --ddp

Loads the quantized export, attaches GIFT-SW (post mode, 4-bit normal noise), runs the library's
training loop for --steps steps (the first one warms up) and prints the top kernels and CPU
operators by total time. Under torchrun with ``--ddp`` every rank trains its rows of each global
batch through DDP, as ``recover`` does, and rank 0 prints its profile.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gift_quant.config import TrainConfig  # noqa: E402
from gift_quant.io.load import load_quantized  # noqa: E402
from gift_quant.train import distributed  # noqa: E402
from gift_quant.train.gift_linear import attach_gift  # noqa: E402
from gift_quant.train.loop import train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("export_dir")
    p.add_argument("--text", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--ddp", action="store_true", help="under torchrun: DDP across the ranks")
    args = p.parse_args()
    from transformers import AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = distributed.init(device) if args.ddp else distributed.Dist()
    device = distributed.rank_device(d, device)
    tok = AutoTokenizer.from_pretrained(args.export_dir)
    model = load_quantized(args.export_dir).to(device)
    attach_gift(model, "normal", 4)
    cfg = TrainConfig(
        data=args.text,
        steps=args.steps + 1,
        batch_size=args.batch,
        grad_accum=1,
        seq_len=args.seq,
        save_every=0,
        parallel="ddp",
    )
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(
        activities=acts, schedule=schedule(wait=0, warmup=1, active=args.steps, repeat=1)
    ) as prof:
        with tempfile.TemporaryDirectory() as out:
            train(
                model,
                tok,
                cfg,
                out,
                fingerprint={},
                device=device,
                progress=False,
                dist=d,
                on_step=prof.step,
            )
    d.close()
    if not d.main:
        return
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
