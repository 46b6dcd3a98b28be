"""A ViT training step, masked vs always-sparse, at 90/95/98% sparsity: time and memory.

The built-in ViT (patch 4 on 32 x 32 x 3 synthetic CIFAR-sized images, depth 6, heads dim/64,
MLP ratio 4), batch 64, SGD with momentum, RigL, ERK, built exactly as ``regrow train`` builds
it (``--backend masked`` or ``--backend sparse``: q, k, v, output and feed-forward projections
as SparseLinear, attention by ``F.scaled_dot_product_attention``; the patch embedding and the
head stay on the masked backend either way). Each (backend, dim, sparsity) runs in its own
subprocess, so its peak RSS is its own. Reported: median time of an ordinary training step
(after two warm-up steps), the time of one topology-update step, and the peak RSS above the
process's baseline. A dense model is the reference.

    python benchmarks/vit_step.py              # dims 192, 384 -> results/vit_step.json
    python benchmarks/vit_step.py --quick      # dim 64, depth 2, 3 steps (checks the script)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")   # as the regrow command does

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, proc_status_bytes, training_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SPARSITIES = (0.9, 0.95, 0.98)


def worker(backend: str, dim: int, depth: int, sparsity: float, batch: int, steps: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from regrow.experiments.config import TrainConfig

    torch.set_num_threads(threads)
    dense = backend == "dense"
    config = TrainConfig(model="vit", dataset="synthetic", method="dense" if dense else "rigl",
                         sparsity=0.0 if dense else sparsity, backend="masked" if dense else backend,
                         model_options={"dim": dim, "depth": depth, "heads": max(1, dim // 64), "mlp_ratio": 4.0,
                                        "patch_size": 4},
                         update_interval=steps + 10, threads=threads).validate()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(10, (batch,), generator=gen)
    base = proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM: the peak is this configuration's
        f.write("5")
    model, dst, step = training_step(config, x, y, 10, total_steps=10 * (steps + 10))

    times = [step() for _ in range(steps + 2)][2:]
    update_s = None
    if not dense:   # run up to the first update step and time it
        while not dst.schedule.is_update(dst.step_count + 1):
            step()
        update_s = step()
    nnz = dst.stats()
    return {"backend": backend, "dim": dim, "depth": depth, "sparsity": 0.0 if dense else sparsity,
            "step_s": statistics.median(times), "step_s_all": times, "update_step_s": update_s,
            "peak_extra_bytes": proc_status_bytes("VmHWM") - base, "density": nnz["density"],
            "sparse_layers": sum(1 for m in model.modules() if type(m).__name__ == "SparseLinear")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dims", default="192,384")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8, help="timed ordinary steps per configuration")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.dims, args.depth, args.steps = "64", 2, 3
    if args.worker is not None:
        backend, dim, sparsity = args.worker
        print(json.dumps(worker(backend, int(dim), args.depth, float(sparsity), args.batch, args.steps, args.threads)))
        return

    rows = []
    started = time.perf_counter()
    for dim in (int(d) for d in args.dims.split(",")):
        plan = [("dense", 0.0)] + [(b, s) for s in SPARSITIES for b in ("masked", "sparse")]
        for backend, sparsity in plan:
            cmd = [sys.executable, __file__, "--worker", backend, str(dim), str(sparsity), "--depth", str(args.depth),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{backend} dim {dim} sparsity {sparsity} failed:\n{proc.stderr[-2000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            upd = "-" if row["update_step_s"] is None else f"{row['update_step_s']:.3f}"
            print(f"dim {dim:>4} {backend:>6} {100 * sparsity:>4g}%: step {row['step_s']:.3f} s "
                  f"(update step {upd} s), peak +{row['peak_extra_bytes'] / 2**20:.0f} MiB", flush=True)

    print(f"\nViT (patch 4, 32x32, depth {args.depth}), batch {args.batch}, {args.threads} thread(s), RigL; "
          f"{cpu_model()}")
    print(f"{'dim':>4} {'sparsity':>8} {'masked s':>9} {'sparse s':>9} {'speed-up':>8} {'masked MiB':>10} "
          f"{'sparse MiB':>10} {'memory':>7}")
    table = []
    for dim in sorted({r["dim"] for r in rows}):
        dense = next(r for r in rows if r["dim"] == dim and r["backend"] == "dense")
        for s in SPARSITIES:
            m = next(r for r in rows if r["dim"] == dim and r["backend"] == "masked" and r["sparsity"] == s)
            sp = next(r for r in rows if r["dim"] == dim and r["backend"] == "sparse" and r["sparsity"] == s)
            entry = {"dim": dim, "sparsity": s, "masked_step_s": m["step_s"], "sparse_step_s": sp["step_s"],
                     "speedup": m["step_s"] / sp["step_s"], "dense_step_s": dense["step_s"],
                     "masked_peak_mib": m["peak_extra_bytes"] / 2**20, "sparse_peak_mib": sp["peak_extra_bytes"] / 2**20,
                     "memory_ratio": m["peak_extra_bytes"] / max(sp["peak_extra_bytes"], 1)}
            table.append(entry)
            print(f"{dim:>4} {100 * s:>7g}% {entry['masked_step_s']:>9.3f} {entry['sparse_step_s']:>9.3f} "
                  f"{entry['speedup']:>7.2f}x {entry['masked_peak_mib']:>10.0f} {entry['sparse_peak_mib']:>10.0f} "
                  f"{entry['memory_ratio']:>6.2f}x")
        print(f"{dim:>4} {'dense':>8} {dense['step_s']:>9.3f}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"vit_step{'_quick' if args.quick else ''}_{args.threads}thread{'s' if args.threads != 1 else ''}.json"
    import torch
    path.write_text(json.dumps({
        "benchmark": "vit_step", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "torch": torch.__version__, "threads": args.threads, "batch": args.batch,
        "depth": args.depth, "loadavg": os.getloadavg(), "wall_s": time.perf_counter() - started,
        "note": "medians of ordinary steps on a shared machine", "rows": rows, "table": table}, indent=1))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
