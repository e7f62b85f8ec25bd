"""The training loss's time and memory: torch's cross-entropy on shifted fp32 logits (what the
training loop ran before) against ``causal_ce_sum`` (what it runs now), forward + backward.

    python tools/bench_loss.py [--batch 8] [--seq 256] [--vocab 49152] [--device cpu]
        [--dtype fp32|bf16] [--rounds 5] [--out FILE.json] (--idle | --shared)

Defaults: the README main command's training batch (8 x 256 tokens, SmolLM2's vocabulary).
Time: the two alternate for --rounds rounds in one process, each on a fresh copy of the same
logits; the median per form and the ratio. Memory: each form once more in a process of its
own, the peak over the logits' own bytes (CPU: the process's peak resident memory; CUDA: the
peak allocated), in MiB. Both forms' results are checked against each other first; a run stops
if they disagree. Prints a table; each JSON row is stamped with the commit, the versions, the
processors and --idle/--shared.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gift_quant.train.cross_entropy import causal_ce_sum  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import add_arguments, provenance, shared_flag, stamp, write_json  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IGNORE = -100


def torch_ce(logits, labels):
    """The loop's loss before causal_ce_sum."""
    V = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, V),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


FORMS = {
    "torch cross_entropy": torch_ce,
    "causal_ce_sum": lambda lg, lb: causal_ce_sum(lg, lb, IGNORE),
}


def inputs(args):
    """Logits (x 3 of standard normals) and labels, made a row at a time, so that making them
    holds nothing larger than the logits themselves."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.empty(args.batch, args.seq, args.vocab, dtype=DTYPES[args.dtype])
    for row in logits.view(-1, args.vocab):
        row.copy_(torch.randn(args.vocab, generator=gen).mul_(3))
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    return logits.to(args.device), labels.to(args.device)


def step(form, logits, labels, device):
    x = logits.clone().requires_grad_()
    t0 = time.perf_counter()
    loss = FORMS[form](x, labels)
    (loss * 0.5).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, loss.detach(), x.grad


def rss_mib() -> float:
    """This process's peak resident memory: VmHWM where Linux has it (ru_maxrss would carry the
    parent's peak across the exec that started this process), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    """One form, once, in this process: its peak memory past the logits it differentiates
    (which the model would have made) and the labels."""
    device = torch.device(args.device)
    logits, labels = inputs(args)
    x = logits.requires_grad_()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device) / 2**20
    else:
        held = rss_mib()  # the peak so far: when the logits were made
    loss = FORMS[args.child](x, labels)
    (loss * 0.5).backward()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mib()
    print(json.dumps({"peak_extra_mib": peak - held}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    add_arguments(ap)
    ap.add_argument("--child", choices=sorted(FORMS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if min(args.batch, args.seq, args.vocab, args.rounds) < 1 or args.seq < 2:
        raise SystemExit("bench_loss: --batch, --vocab and --rounds must be >= 1, --seq >= 2")
    if args.child:
        return child(args)
    device = torch.device(args.device)
    prov = provenance(shared_flag(ap, args))
    logits, labels = inputs(args)
    _, la, ga = step("torch cross_entropy", logits, labels, device)
    _, lb, gb = step("causal_ce_sum", logits, labels, device)
    rel = float((la - lb).abs() / la.abs())
    gerr = float((ga.float() - gb.float()).abs().max())
    # the same sum up to its order; the same gradient up to two roundings to the logits' dtype
    if not rel <= 1e-5 or not gerr <= 2**-6 * float(ga.float().abs().max()):
        raise SystemExit(
            f"bench_loss: the two losses disagree (loss {rel:.1e}, gradient {gerr:.1e})"
        )
    print(
        f"loss {float(la):.6g} / {float(lb):.6g} (relative difference {rel:.1e}), "
        f"largest gradient difference {gerr:.1e}",
        flush=True,
    )
    del ga, gb
    times = {f: [] for f in FORMS}
    for _ in range(args.rounds):
        for form in FORMS:
            times[form].append(step(form, logits, labels, device)[0])
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child"]
    peaks = {
        f: json.loads(subprocess.run([*cmd, f], capture_output=True, text=True, check=True).stdout)[
            "peak_extra_mib"
        ]
        for f in FORMS
    }
    logits_mib = logits.numel() * logits.element_size() / 2**20
    ref = statistics.median(times["torch cross_entropy"])
    settings = dict(
        batch=args.batch,
        seq=args.seq,
        vocab=args.vocab,
        device=str(device),
        dtype=args.dtype,
        rounds=args.rounds,
        logits_mib=logits_mib,
        loss_rel_diff=rel,
        grad_max_abs_diff=gerr,
    )
    rows = []
    print(
        f"\n{args.batch} x {args.seq} tokens, vocabulary {args.vocab}, {args.dtype} logits "
        f"({logits_mib:.0f} MiB) on {device}; forward + backward, median of {args.rounds}\n"
    )
    print("| loss | seconds | x torch's time | peak memory past the logits (MiB) |")
    print("|---|---:|---:|---:|")
    for form in FORMS:
        med = statistics.median(times[form])
        rows.append(
            dict(
                form=form,
                seconds=med,
                seconds_all=times[form],
                ratio=med / ref,
                peak_extra_mib=peaks[form],
                **settings,
            )
        )
        print(f"| {form} | {med:.3f} | {med / ref:.2f} | {peaks[form]:.0f} |")
    if args.out:
        print(f"wrote {write_json(args.out, [stamp(r, prov) for r in rows])}")


if __name__ == "__main__":
    main()
