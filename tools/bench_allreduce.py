"""All-reduce bandwidth between the GPUs of this host, as DDP's gradient sync sees it.

    torchrun --standalone --nproc_per_node 2 tools/bench_allreduce.py [--mb 200]

Times an all-reduce of --mb MiB (fp32 and bf16) over NCCL, after warm-up; rank 0 prints
milliseconds and bus bandwidth. Run with NCCL_DEBUG=INFO to see which transport NCCL chose.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=200.0)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    world = dist.get_world_size()
    for dtype in (torch.float32, torch.bfloat16):
        n = int(args.mb * 2**20) // torch.finfo(dtype).bits * 8
        x = torch.ones(n, dtype=dtype, device="cuda")
        for _ in range(3):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / args.iters * 1e3
        bus = 2 * (world - 1) / world * x.numel() * x.element_size() / (ms / 1e3) / 1e9
        if dist.get_rank() == 0:
            print(f"all-reduce {args.mb:.0f} MiB of {dtype}: {ms:.2f} ms, bus {bus:.1f} GB/s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
