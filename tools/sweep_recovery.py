"""Recovery sweep as an experiment: bits x method x seeds x budget, every row one `recover` job.

    python tools/sweep_recovery.py --machine idle [--bits 4 3 2] [--methods base salient-ft ...]
        [--seeds 0 1 2] [--budget 500x32x512 ...] [--micro-batch 8] [--lr 1e-4]
        [--recipe smollm2-w3g64-gift] [--set section.key=value ...] [--out FILE.json]
        [--jobs N] [--gpus K] [--gpu-memory-mb MIB]
    python tools/sweep_recovery.py --report [--out FILE.json]    # tables and plots only

A budget is STEPSxBATCHxSEQ_LEN (BATCH sequences per optimizer step, in micro-batches of
--micro-batch). The device is the recipe's (model.device=auto: cuda when present, else cpu).

Every row starts from a shared quantized model per (bits, quantization settings): the start is
quantized once by a `recover` run with train.method=none (which is also the "before training"
row of those settings) and every trained row points its OUT/quantized at it, so rows differ only
in what they train, their seed and their budget. Pre-mode rows quantize after training, so they
make their own. ``--jobs N`` runs N trained rows at a time (a 135M model leaves most of an H200
idle), ``--gpus K`` spreads them over cuda:0..K-1; every row records ``concurrent_jobs``, since
its step time was then measured beside other rows. A row goes to the GPU with the least
expected memory in use where it fits (expected: its method's largest recorded peak, +10% and
1.5 GiB; a GPU's memory from nvidia-smi or --gpu-memory-mb), and waits while none has room:
a DoRA row needs 2.3x a GIFT-SW row's memory. Rows that still fail out of GPU memory are
retried at the end, one per GPU, resuming from their checkpoints. Each row runs in its own
process (peak memory is its own: CUDA max_memory_allocated on a GPU, peak RSS on the CPU) and
is saved to the JSON as one record keyed by its settings; a rerun skips recorded rows, and an
interrupted row resumes from its training checkpoints (a row trained in part by an earlier
sweep says so: ``resumed_from_earlier_sweep``). The step time is the median of the per-step
times in metrics.jsonl after the first step (evaluation and checkpoint time excluded).
In-training perplexity is measured on the full held-out protocol every --eval-every steps, so
the curves end at the final figure.

Prints mean +- std (sample std over seeds) per setting, GIFT-SW vs LoRA vs DoRA step-time and
peak-memory ratios from the same sweep, and the four paper claims (claims 1 and 3 also at the
default 6-bit noise) checked against the rows present. With matplotlib (the [plots] extra) it
draws FILE_curves.png (held-out perplexity against training tokens) and FILE_pareto.png
(perplexity against bits per weight).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance as common  # noqa: E402
from gpu_pool import GpuPool, gpu_memory_mb  # noqa: E402
from provenance import child_env  # noqa: E402
from sweep_methods import (  # noqa: E402
    DEFAULT_METHODS,
    METHODS,
    budget_text,
    is_pre,
    metric_of,
    quant_overrides,
    train_method,
    trains,
)
from sweep_report import report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# what a row's error says when its GPU ran out of memory (torch's allocator, or cuBLAS's handle)
OUT_OF_MEMORY = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "OutOfMemoryError",
    "CUBLAS_STATUS_ALLOC_FAILED",
)


def parse_budget(text: str) -> dict:
    """STEPSxBATCHxSEQ_LEN -> {"steps", "batch", "seq_len"} (argparse's type for --budget)."""
    try:
        steps, batch, seq_len = (int(x) for x in text.lower().split("x"))
    except ValueError:
        steps = batch = seq_len = 0
    if min(steps, batch, seq_len) <= 0:
        raise argparse.ArgumentTypeError(
            f"a budget is STEPSxBATCHxSEQ_LEN of positive integers such as 500x32x512, got {text!r}"
        )
    return {"steps": steps, "batch": batch, "seq_len": seq_len}


def provenance(machine: str) -> dict:
    """Commit and environment of this run: the tools' common stamp, peft's version, and whether
    the rows ran under CUDA MPS (concurrent rows then share the GPU's SMs instead of taking
    turns, which changes their step times, not their results)."""
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    # a client finds the MPS daemon by this variable, or at its default pipe directory
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps"
    mps = (Path(pipe) / "control").exists()
    return {**common.provenance(machine == "shared"), "peft": peft_version, "cuda_mps": mps}


def why_failed(stderr: str) -> str:
    """A failed run's reason from its stderr: the last line, and an out-of-memory line from
    above it (CUDA's errors end with a hint line) where there is one."""
    lines = stderr.strip().splitlines() or ["(no stderr)"]
    oom = next((x.strip() for x in lines[-20:] if any(m in x for m in OUT_OF_MEMORY)), None)
    return lines[-1] if oom is None or oom == lines[-1].strip() else f"{lines[-1]} / {oom}"


def subprocess_recover(out: Path, recipe: str, overrides: list[str]) -> dict:
    """One `python -m gift_quant recover` process (this checkout's package); its report."""
    cmd = [sys.executable, "-m", "gift_quant", "recover", "--recipe", recipe, "--out", str(out)]
    cmd += ["--json", "-q"]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=child_env(ROOT))
    if proc.returncode:
        raise RuntimeError(f"recover failed ({why_failed(proc.stderr)}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _slug(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def _key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


class Sweep:
    """The grid, its work directory and its JSON (records saved as they finish)."""

    def __init__(self, args, runner=subprocess_recover) -> None:
        self.args, self.runner = args, runner
        # absolute: the row processes run in the checkout (cwd=ROOT), not where the sweep started
        self.work = Path(args.work).resolve()
        self.out = Path(args.out).resolve()
        self.results = load_results(self.out)
        self.env = None  # provenance, computed once when the first row runs
        self.failed: list[str] = []
        self.out_of_memory: set[str] = set()  # work dirs of rows that failed out of GPU memory
        self.concurrent = max(1, getattr(args, "jobs", 1))
        self.retried: set[str] = set()  # rows run again after running out of GPU memory
        self.failed_starts: set[Path] = set()
        self.lock = threading.Lock()  # rows finish in worker threads under --jobs
        gpus = getattr(args, "gpus", 0)
        self.capacity = getattr(args, "gpu_memory_mb", 0.0) or (gpu_memory_mb() if gpus else 0)
        self.pool = GpuPool(max(1, getattr(args, "jobs", 1)), gpus, self.capacity)

    def common(self) -> dict:
        a = self.args
        return {"recipe": a.recipe, "sets": list(a.set), "device": a.device}

    def has(self, key: dict) -> bool:
        text = _key_text(key)
        return any(_key_text(r["key"]) == text for r in self.results["rows"])

    def save(self, record: dict) -> None:
        with self.lock:
            self.results["rows"].append(record)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_name(self.out.name + ".tmp")
            tmp.write_text(json.dumps(self.results, indent=1) + "\n")
            os.replace(tmp, self.out)

    def sets(self, overrides: list[str], device: str | None = None) -> list[str]:
        """A row's --set list: its own overrides, then the device and the sweep's --set."""
        return [*overrides, f"model.device={device or self.args.device}", *self.args.set]

    def memory_need(self, method: str) -> float:
        """Expected peak GPU memory of a ``method`` row (MiB): the largest this method's
        recorded rows of this recipe needed (none yet: the rows of methods that train the same
        way, ``train.method``), plus a tenth and 1.5 GiB for the CUDA context; 0 (no estimate:
        placed by count) before any such row ran on a GPU."""

        def peaks(methods: set[str]) -> list[float]:
            return [
                r["peak_gpu_mb"]
                for r in self.results["rows"]
                if r["key"].get("method") in methods
                and r["key"].get("recipe") == self.args.recipe
                and r.get("peak_gpu_mb")
            ]

        trainer = train_method(method)
        found = peaks({method}) or peaks({m for m in METHODS if train_method(m) == trainer})
        return 1.1 * max(found) + 1536 if found else 0.0

    def run(self, out: Path, overrides: list[str], need_mb: float = 0.0) -> dict | None:
        gpu = self.pool.acquire(need_mb)  # one of --jobs, on the GPU with room for it
        device = f"cuda:{gpu}" if gpu is not None else None
        try:
            return self.runner(out, self.args.recipe, self.sets(overrides, device))
        except RuntimeError as exc:
            print(f"FAILED {out.name}: {exc}", file=sys.stderr, flush=True)
            with self.lock:
                self.failed.append(out.name)
                if any(m in str(exc) for m in OUT_OF_MEMORY):
                    self.out_of_memory.add(out.name)
            return None
        finally:
            self.pool.release(gpu, need_mb)

    def run_grid(self, grid: list[tuple], workers: int) -> None:
        """The quantized starts first (every post-mode row reads one; methods with the same
        quantization settings share one, so no two rows make it at once), then the rows;
        ``workers`` at a time."""
        starts: dict[Path, tuple[int, str]] = {}
        for bits, method, _, _ in grid:
            if not is_pre(method):
                starts.setdefault(self.start_of(bits, method)[2], (bits, method))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for done in [pool.submit(self.guarded, self.start, *s) for s in starts.values()]:
                done.result()
            for done in [pool.submit(self.guarded, self.row, *row) for row in grid]:
                done.result()

    def guarded(self, step, bits: int, method: str, *rest) -> None:
        """``step`` (a start or a row); an error in it fails that row, not the whole grid."""
        try:
            step(bits, method, *rest)
        except Exception as exc:  # noqa: BLE001 - reported, counted in the exit status
            name = f"w{bits}-{method}" + (f"-s{rest[0]}" if rest else "")
            print(f"FAILED {name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            with self.lock:
                self.failed.append(name)

    def retry_out_of_memory(self, grid: list[tuple]) -> None:
        """Run again, one per GPU (or one at a time), the rows that failed out of GPU memory;
        they resume from their checkpoints and record the lower concurrency (and the one their
        earlier steps ran at)."""
        if not self.out_of_memory:
            return
        per = max(1, getattr(self.args, "gpus", 0))
        if max(1, getattr(self.args, "jobs", 1)) <= per:
            print("rows ran out of GPU memory one per GPU already: not retried", flush=True)
            return
        print(
            f"retrying {len(self.out_of_memory)} rows that ran out of GPU memory, {per} at a time",
            flush=True,
        )
        oom = self.out_of_memory
        again = [
            row
            for row in grid
            if self.row_dir(*row).name in oom
            or (not is_pre(row[1]) and self.start_of(*row[:2])[2].name in oom)
        ]
        self.failed = [f for f in self.failed if f not in oom]
        self.failed_starts = {d for d in self.failed_starts if d.name not in oom}
        self.out_of_memory = set()
        # rows that had trained some steps before they failed (a retry resumes them)
        self.retried = {
            d.name
            for d in (self.row_dir(*row) for row in again)
            if d.name in oom and (d / "train" / "metrics.jsonl").is_file()
        }
        self.concurrent = per
        self.pool = GpuPool(per, getattr(self.args, "gpus", 0), self.capacity)
        self.run_grid(again, per)

    def check(self, grid: list[tuple]) -> None:
        """Every row's recipe is valid, before any row runs (one line naming the row if not)."""
        if "gift_quant" not in sys.modules:
            sys.path.insert(0, str(ROOT))  # this checkout's package, as the row processes use
        from gift_quant.recipe import RecipeError, find_recipe, load_recipe

        for bits, method, seed, budget in grid:
            a = self.args
            if budget["batch"] % (a.micro_batch or budget["batch"]):
                raise SystemExit(
                    f"--micro-batch {a.micro_batch} must divide every budget's batch, "
                    f"not {budget['batch']}"
                )
            try:
                sets = self.sets(self.overrides(bits, method, seed, budget))
                metric = load_recipe(find_recipe(a.recipe), sets).saliency.metric
            except RecipeError as exc:
                raise SystemExit(f"row w{bits} {method}: {exc}") from None
            if metric != metric_of(method):  # the rows and claims are named after their metric
                raise SystemExit(
                    f"row w{bits} {method} would rank columns with saliency.metric={metric}, "
                    f"not {metric_of(method)}: use a recipe that names saliency.metric: gift, "
                    "and no --set of the metric"
                )

    def start_overrides(self, bits: int, method: str) -> list[str]:
        return [f"quant.bits={bits}", *quant_overrides(method), "train.method=none"]

    def start_of(self, bits: int, method: str) -> tuple[dict, str, Path]:
        """(key, name, work directory) of the quantized start that ``method`` trains from."""
        quant = quant_overrides(method)
        untrained = [m for m in METHODS if not trains(m) and quant_overrides(m) == quant]
        # no untrained method of these settings: named after the first method that has them,
        # so every method with the same quantization shares one start
        first = next(m for m in METHODS if quant_overrides(m) == quant)
        name = untrained[0] if untrained else f"{first} (before training)"
        key = {**self.common(), "bits": bits, "quant": quant, "method": name}
        return key, name, self.work / "starts" / f"w{bits}-{_slug(key)}"

    def row_dir(self, bits: int, method: str, seed: int, budget: dict) -> Path:
        key = self.key(bits, method, seed, budget)
        return self.work / "rows" / f"{method}-w{bits}-s{seed}-{_slug(key)}"

    def start(self, bits: int, method: str) -> Path | None:
        """The quantized start of ``method``'s quantization settings at ``bits`` (made once),
        recorded as an untrained row."""
        key, name, d = self.start_of(bits, method)
        made = (d / "quantized" / "config.json").is_file()
        if self.has(key) and made:
            return d
        if d in self.failed_starts:  # its rows fail with it, without retrying it each
            return None
        try:
            report = self.run(d, self.start_overrides(bits, method))
            if report is None:
                self.failed_starts.add(d)
                return None
            if self.has(key):  # recorded by an earlier sweep whose work directory is gone
                return d
            self.save(self.record(key, report, d))
        except Exception:  # any error: its rows fail with it, and it is not made again each
            self.failed_starts.add(d)
            raise
        print(f"w{bits} {name:34s} ppl {report['perplexity_recovered']:9.3f}", flush=True)
        return d

    def key(self, bits: int, method: str, seed: int, budget: dict) -> dict:
        a = self.args
        return {
            **self.common(),
            "bits": bits,
            "method": method,
            "seed": seed,
            **budget,
            "micro_batch": a.micro_batch or budget["batch"],
            "lr": a.lr,
            "eval_every": a.eval_every or max(1, budget["steps"] // 10),
        }

    def overrides(self, bits: int, method: str, seed: int, budget: dict) -> list[str]:
        if not trains(method):
            return self.start_overrides(bits, method)
        key = self.key(bits, method, seed, budget)
        return [
            f"quant.bits={bits}",
            *METHODS[method][1],
            f"train.seed={seed}",
            f"train.steps={budget['steps']}",
            f"train.batch_size={key['micro_batch']}",
            f"train.grad_accum={budget['batch'] // key['micro_batch']}",
            f"train.seq_len={budget['seq_len']}",
            f"train.lr={self.args.lr}",
            f"train.eval_every={key['eval_every']}",
            f"train.eval_tokens={10**9}",  # the whole held-out protocol
        ]

    def row(self, bits: int, method: str, seed: int, budget: dict) -> None:
        if not trains(method):
            self.start(bits, method)
            return
        key = self.key(bits, method, seed, budget)
        if self.has(key):
            return
        d = self.row_dir(bits, method, seed, budget)
        if not is_pre(method):
            start = self.start(bits, method)
            if start is None:
                return
            d.mkdir(parents=True, exist_ok=True)
            link = d / "quantized"
            if link.is_symlink() and not link.exists():  # its start was made elsewhere, or lost
                link.unlink()
            if not link.exists():
                link.symlink_to((start / "quantized").resolve())
            for f in ("eval_fp.json", "eval_quantized.json"):
                if not (d / f).exists():
                    (d / f).write_bytes((start / f).read_bytes())
        resumed = (d / "train" / "metrics.jsonl").is_file()  # steps of an earlier sweep
        report = self.run(d, self.overrides(bits, method, seed, budget), self.memory_need(method))
        if report is None:
            return
        rec = self.record(key, report, d)
        if resumed and "earlier_concurrent_jobs" not in rec:
            # trained in part by an earlier sweep process, at a concurrency not known here
            rec["resumed_from_earlier_sweep"] = True
        self.save(rec)
        print(
            f"w{bits} {method:16s} seed {seed} {budget_text(key):12s} "
            f"ppl {report['perplexity_recovered']:9.3f}",
            flush=True,
        )

    def record(self, key: dict, report: dict, out: Path) -> dict:
        if self.env is None:
            self.env = provenance(self.args.machine)
        t = report.get("train") or {}
        rec = {
            "key": key,
            "concurrent_jobs": self.concurrent,  # > 1: step times measured side by side
            "perplexity": report["perplexity_recovered"],
            "perplexity_quantized": report["perplexity_quantized"],
            "perplexity_fp": report["perplexity_fp"],
            "eval_tokens": report["eval_tokens"],
            "bits_per_weight": report["bits_per_weight"],
            "seconds": report["seconds"],
            "environment": self.env,
        }
        if t:
            lines = (out / "train/metrics.jsonl").read_text().splitlines()
            metrics = [json.loads(x) for x in lines if x.strip()]
            rec.update(
                trainable_params=t["trainable_params"],
                tokens=t["tokens"],
                step_seconds=step_seconds(metrics),
                peak_gpu_mb=t["peak_gpu_mb"],
                peak_rss_mb=t["peak_rss_mb"],
                curve=curve(metrics, report["perplexity_quantized"]),
            )
        if out.name in self.retried:  # its steps before the failure ran beside more rows
            rec["earlier_concurrent_jobs"] = max(1, getattr(self.args, "jobs", 1))
        return rec


def step_seconds(metrics: list[dict]) -> float:
    """Median optimizer-step time, first step (warm-up) left out when there are others."""
    times = [m["seconds"] for m in metrics]
    return statistics.median(times[1:] or times)


def curve(metrics: list[dict], before: float | None) -> list[list[float]]:
    """[[training tokens, held-out perplexity], ...]; starts at (0, before) when known.

    A killed run's metrics.jsonl may repeat the steps after its last checkpoint: the last
    line of each step wins."""
    by_step = {m["step"]: m for m in metrics}
    points = [[0, before]] if before is not None else []
    tokens = 0
    for step in sorted(by_step):
        m = by_step[step]
        tokens += m["tokens"]
        if "eval" in m:
            points.append([tokens, m["eval"]["perplexity"]])
    return points


def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {
        "what": "recovery sweep (tools/sweep_recovery.py): held-out perplexity per row; "
        "one record per (settings, seed)",
        "rows": [],
    }


def main(argv=None, runner=subprocess_recover) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--machine", choices=["shared", "idle"], help="recorded in every row")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", nargs="+", default=[parse_budget("500x32x512")], type=parse_budget)
    p.add_argument("--micro-batch", type=int, default=0, help="sequences per forward (0 = all)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-every", type=int, default=0, help="0 = a tenth of the steps")
    p.add_argument("--recipe", default="smollm2-w3g64-gift")
    p.add_argument("--set", action="append", default=[], help="section.key=value for every row")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", default=str(ROOT / "runs/sweep_recovery"))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/sweep_smollm2.json"))
    p.add_argument("--report", action="store_true", help="only print and plot the saved JSON")
    p.add_argument(
        "--jobs", type=int, default=1, help="trained rows run this many at a time (small models)"
    )
    p.add_argument("--gpus", type=int, default=0, help="spread the jobs over cuda:0..GPUS-1")
    p.add_argument(
        "--gpu-memory-mb",
        type=float,
        default=0.0,
        help="memory of one GPU for placing rows by their expected peak (0: nvidia-smi's)",
    )
    args = p.parse_args(argv)
    if args.jobs < 1 or args.gpus < 0:
        raise SystemExit(f"--jobs must be >= 1 and --gpus >= 0, got {args.jobs} and {args.gpus}")
    out = Path(args.out)
    if args.report:
        if not out.is_file():
            raise SystemExit(f"--report: {out} does not exist; run the sweep first")
        report(json.loads(out.read_text()), out)
        return 0
    if args.machine is None:
        raise SystemExit("--machine shared|idle is required: every row records it")
    sweep = Sweep(args, runner)
    # seed-major: a sweep cut short has every setting at its first seeds, not some at all three
    grid = [
        (bits, method, seed, budget)
        for budget in args.budget
        for seed in args.seeds
        for bits in args.bits
        for method in args.methods
        if trains(method) or seed == args.seeds[0]
    ]
    sweep.check(grid)
    sweep.run_grid(grid, args.jobs)
    sweep.retry_out_of_memory(grid)
    report(sweep.results, out)
    if sweep.failed:
        print(f"\n{len(sweep.failed)} rows failed (rerun to retry): {sweep.failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
