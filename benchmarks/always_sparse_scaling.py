"""Time and memory of a training step against width: always-sparse GSE vs masked RigL vs dense.

Network: 784 -> W -> W -> 10 ReLU MLP, batch 128, SGD with momentum, random data (the timing
does not depend on it). Every output neuron has 64 inputs:

- ``sparse_gse``: ``regrow.nn.sparse_mlp(fan_in=64)`` (SparseLinear layers) under
  ``DynamicSparsity(method="gse")``, uniform sampling, gamma 1: N = 64 (2W + 10) weights.
- ``masked_rigl``: nn.Linear layers under ``DynamicSparsity(method="rigl")`` with the same
  total number of non-zeros (ERK allocation): dense weights and masks, dense gradients.
- ``dense``: the plain nn.Linear MLP with ``optimizer.step()``.

Each (variant, width) runs in its own subprocess, so its peak RSS (``VmHWM``) is its own; widths
double from 1000 up to 256000, variants interleaved width by width. A variant stops at the first
width whose peak RSS, predicted from its last two widths, exceeds ``--mem-cap-gib``, or after a
width whose ordinary step took longer than ``--max-step-s``. Step time: median of the ordinary
steps (after a warm-up step, as many as fit in ``--seconds``, 3 to 100); one update step
(topology update of the DST variants) is timed separately, and so is the step after it (it
rebuilds the layers' index structures); ``amortised`` is the time per step with one update
every 100 steps (the default update interval), both counted. The log-log slopes of
time and memory against width are least-squares fits over all measured widths and over those
>= 32000 (past the cache cliff: there the activations, W x 128 floats, no longer fit in the
2 MB L2 of a core and every gathered input row comes from L3 or DRAM); memory is the peak RSS above the
process's baseline after imports.

    python benchmarks/always_sparse_scaling.py           # full run (about 10 min) -> results/always_sparse_scaling.json
    python benchmarks/always_sparse_scaling.py --quick   # widths 1k-8k -> results/always_sparse_scaling_quick.json
    python benchmarks/always_sparse_scaling.py --threads 2   # -> results/always_sparse_scaling_2threads.json
    THP_MEM_ALLOC_ENABLE=0 python benchmarks/always_sparse_scaling.py   # torch without huge pages -> ..._nothp.json
    THP_MEM_ALLOC_ENABLE=0 python benchmarks/always_sparse_scaling.py --variants sparse_gse \
        --min-width 4000 --max-width 64000 --batch 32    # regrow's own madvise only -> ..._nothp_batch32_sparse_gse.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from _common import proc_status_bytes

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("sparse_gse", "masked_rigl", "dense")
FAN_IN, BATCH, IN, CLASSES = 64, 128, 784, 10
UPDATE_EVERY = 100   # for the amortised step time


# -- one (variant, width), in a worker process ---------------------------------------------------
def worker(variant: str, width: int, seconds: float, threads: int, batch: int = BATCH) -> dict:
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    import regrow
    from regrow.nn import _sparse_kernels, sparse_mlp

    torch.set_num_threads(threads)
    _sparse_kernels.load()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, IN, generator=gen)
    y = torch.randint(CLASSES, (batch,), generator=gen)
    base = proc_status_bytes("VmRSS")
    try:   # reset VmHWM so the peak is this configuration's own
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

    t0 = time.perf_counter()
    if variant == "sparse_gse":
        model = sparse_mlp(IN, [width, width], CLASSES, fan_in=FAN_IN, seed=0)
    else:
        model = nn.Sequential(nn.Flatten(), nn.Linear(IN, width), nn.ReLU(inplace=True),
                              nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    build_s = time.perf_counter() - t0

    def step(step_fn) -> float:
        start = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        step_fn()
        return time.perf_counter() - start

    # warm-up (first touches of memory, lazy index structures), then as many ordinary steps as
    # fit in about `seconds` (3 to 100), then one topology update step and the step after it
    warm = step(opt.step)
    every = 2 + max(3, min(100, int(seconds / max(warm, 1e-3))))
    dst = None
    nnz_sparse = FAN_IN * (2 * width + CLASSES)
    if variant == "sparse_gse":
        dst = regrow.DynamicSparsity(model, opt, method="gse", sparsity=0.9, total_steps=10 * every,
                                     update_interval=every)
    elif variant == "masked_rigl":
        total = IN * width + width * width + width * CLASSES
        dst = regrow.DynamicSparsity(model, opt, method="rigl", sparsity=1.0 - nnz_sparse / total,
                                     total_steps=10 * every, update_interval=every, distribution="erk")
    ordinary = [step(dst.step if dst is not None else opt.step) for _ in range(1, every)]
    updates = [step(dst.step)] if dst is not None else []   # step `every`: a topology update
    # the first step after a rewire also rebuilds the layers' index structures (CSC, panels)
    after_update = [step(dst.step)] if dst is not None else []
    if variant == "masked_rigl":
        ordinary = ordinary[1:]   # its first masked step also zeroes the pruned weights' momentum
    stats = dst.stats() if dst is not None else None
    return {"variant": variant, "width": width, "steps": len(ordinary) + len(updates), "build_s": build_s,
            "step_s": statistics.median(ordinary), "update_step_s": statistics.median(updates) if updates else None,
            "after_update_step_s": after_update[0] if after_update else None,
            "peak_rss": proc_status_bytes("VmHWM"), "baseline_rss": base, "extra_rss": proc_status_bytes("VmHWM") - base,
            "nnz": stats["nnz"] if stats else sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight")),
            "density": stats["density"] if stats else 1.0}


# -- driver ----------------------------------------------------------------------------------------
def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) against log(x)."""
    pts = [(math.log(a), math.log(b)) for a, b in points if a > 0 and b > 0]
    if len(pts) < 2:
        return None
    mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def amortised(row: dict) -> float:
    """Time per step with one update every UPDATE_EVERY steps, counting the step after it."""
    if row["update_step_s"] is None:
        return row["step_s"]
    after = row.get("after_update_step_s")
    if after is None:   # results written before the step after an update was timed
        return ((UPDATE_EVERY - 1) * row["step_s"] + row["update_step_s"]) / UPDATE_EVERY
    return ((UPDATE_EVERY - 2) * row["step_s"] + row["update_step_s"] + after) / UPDATE_EVERY


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="widths 1000-8000, few steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1: the machine is shared)")
    ap.add_argument("--mem-cap-gib", type=float, default=8.0, help="stop a variant before its predicted peak RSS exceeds this")
    ap.add_argument("--max-step-s", type=float, default=20.0, help="stop a variant after a width whose step took longer")
    ap.add_argument("--max-width", type=int, default=256_000)
    ap.add_argument("--seconds", type=float, default=None, help="time for the ordinary steps of one configuration")
    ap.add_argument("--min-width", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    if args.worker is not None:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), seconds, args.threads, args.batch)))
        return

    import torch
    max_width = 8000 if args.quick else args.max_width
    widths = [1000 * 2 ** k for k in range(20) if args.min_width <= 1000 * 2 ** k <= max_width]
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    cap = args.mem_cap_gib * 2**30
    # torch's CPU allocator asks for transparent huge pages on large tensors: the kernels' random
    # gathers then miss the TLB far less (5-20% faster at 256k); every variant gets the same
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "1")
    info = {"cpu": platform.processor(), "cores": os.cpu_count(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
            "loadavg_start": os.getloadavg(), "mem_cap_gib": args.mem_cap_gib, "max_step_s": args.max_step_s,
            "batch": args.batch, "fan_in": FAN_IN, "THP_MEM_ALLOC_ENABLE": thp,
            # regrow's own madvise on its kernel buffers (regrow.core.hugepages), on unless set to 0
            "REGROW_HUGE_PAGES": os.environ.get("REGROW_HUGE_PAGES", "1")}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    rows: list[dict] = []
    stopped: dict[str, str] = {}
    started = time.perf_counter()
    for width in widths:
        for variant in variants:
            if variant in stopped:
                continue
            done = [r for r in rows if r["variant"] == variant]
            if len(done) >= 2:
                s = slope([(r["width"], r["peak_rss"]) for r in done[-2:]])
                predicted = done[-1]["peak_rss"] * (width / done[-1]["width"]) ** s
                if predicted > cap:
                    stopped[variant] = f"width {width}: predicted peak RSS {predicted / 2**30:.1f} GiB > cap"
                    continue
            cmd = [sys.executable, __file__, "--worker", variant, str(width), "--seconds", str(seconds),
                   "--threads", str(args.threads), "--batch", str(args.batch)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                       THP_MEM_ALLOC_ENABLE=thp)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                stopped[variant] = f"width {width}: worker failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}"
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            upd = f"{row['update_step_s']:.3f}" if row["update_step_s"] is not None else "-"
            print(f"{variant:>12} W={width:>7}: step {row['step_s']:.3f} s, update step {upd} s, "
                  f"peak RSS {row['peak_rss'] / 2**30:.2f} GiB (+{row['extra_rss'] / 2**30:.2f})", flush=True)
            if row["step_s"] > args.max_step_s:
                stopped[variant] = f"after width {width}: step time above {args.max_step_s} s"
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - started

    summary = {}
    for variant in variants:
        done = [r for r in rows if r["variant"] == variant]
        upper = [r for r in done if r["width"] >= 32000]
        summary[variant] = {
            "widths": [r["width"] for r in done],
            "slope_step_time": slope([(r["width"], r["step_s"]) for r in done]),
            "slope_amortised_time": slope([(r["width"], amortised(r)) for r in done]),
            "slope_extra_rss": slope([(r["width"], r["extra_rss"]) for r in done]),
            "slope_step_time_w_ge_32k": slope([(r["width"], r["step_s"]) for r in upper]),
            "slope_extra_rss_w_ge_32k": slope([(r["width"], r["extra_rss"]) for r in upper]),
            "stopped": stopped.get(variant, "largest width reached"),
        }

    print(f"\n784-W-W-10 MLP, fan-in {FAN_IN}, batch {args.batch}, {args.threads} thread(s); {info['cpu']}, "
          f"torch {info['torch']}, {info['date']}")
    print(f"{'width':>8} " + " ".join(f"{v + ' step s':>18} {'amort.':>7} {'peak GiB':>8}" for v in variants))
    for width in widths:
        cells = []
        for v in variants:
            r = next((r for r in rows if r["variant"] == v and r["width"] == width), None)
            cells.append(f"{r['step_s']:>18.3f} {amortised(r):>7.3f} {r['peak_rss'] / 2**30:>8.2f}" if r
                         else f"{'-':>18} {'-':>7} {'-':>8}")
        print(f"{width:>8} " + " ".join(cells))
    fmt = lambda s: "n/a" if s is None else f"{s:.2f}"  # noqa: E731
    for v, s in summary.items():
        print(f"{v:>12}: log-log slope time {fmt(s['slope_step_time'])} (amortised {fmt(s['slope_amortised_time'])}, "
              f"W>=32k {fmt(s['slope_step_time_w_ge_32k'])}), memory {fmt(s['slope_extra_rss'])} "
              f"(W>=32k {fmt(s['slope_extra_rss_w_ge_32k'])}); stopped: {s['stopped']}")
    RESULTS.mkdir(exist_ok=True)
    stem = "always_sparse_scaling" + ("_quick" if args.quick else "") + (f"_{args.threads}threads" if args.threads != 1 else "") \
        + ("_nothp" if thp == "0" else "") + (f"_batch{args.batch}" if args.batch != BATCH else "") \
        + ("" if variants == list(VARIANTS) else "_" + "_".join(variants)) \
        + ("_nomadvise" if os.environ.get("REGROW_HUGE_PAGES") == "0" else "")
    path = RESULTS / f"{stem}.json"
    path.write_text(json.dumps({"benchmark": "always_sparse_scaling", "machine": info, "rows": rows,
                                "summary": summary}, indent=1))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
