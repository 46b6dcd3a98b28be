"""SparseConv2d by measurement: ResNet-style 3x3 convolutions, then a whole ResNet-20 step.

Part 1, one convolution: forward + backward (input gradient and weight gradient) of 3x3
convolutions, stride 1, padding 1, 64->64 at 32x32, 128->128 at 16x16, 256->256 at 8x8, batch
64, at 80/90/95/98/99% sparsity (constant fan-in). Variants, each checked against the dense
convolution with the same (masked) kernel before timing (output, input gradient, active-tap
gradients; the largest error relative to the largest reference value is recorded):

- ``dense``: nn.Conv2d with the masked dense kernel (oneDNN/MKL); the baseline of every ratio.
- ``torch``: ``regrow.nn.SparseConv2d`` on its pure-torch route: per kernel offset, a CSR matrix
  of that offset's taps times the input slice of the needed channels (an implicit im2col of one
  offset at a time, never of the whole input).
- ``compiled``: the same layer on its compiled route (``regrow.nn._conv_kernels``): a direct
  sparse convolution over each output channel's taps on a batch-innermost copy of the input.
- ``sparseprop`` / ``sparseprop_on``: SparseProp's ``SparseConv2d`` (PyPI ``sparseprop``, an
  optional extra: ``pip install pybind11 && pip install --no-build-isolation sparseprop``) in
  its two modes (vectorised over the batch, or over the output width); when the package does
  not import, the output and the JSON say why and the columns are left out.

Part 2, a ResNet-20 training step (CIFAR-sized random input, batch 64, SGD with momentum,
RigL with its update interval beyond the timed steps, so these are ordinary steps), built as
``regrow train`` builds it: ``--backend masked`` (dense convolutions with masks) against
``--backend sparse`` (every convolution a SparseConv2d, the classifier a SparseLinear), at 90 and
95% sparsity, plus the sparse backend with ``REGROW_DISABLE_KERNEL=1`` (the torch routes) and a
dense model. Each configuration runs in its own process.

Each thread count runs in its own processes (OMP_NUM_THREADS / MKL_NUM_THREADS set before
torch starts; THP_MEM_ALLOC_ENABLE=1 as the regrow command sets it). The machine is shared and
noisy: variants are timed in turn, round after round; a cell is the median over rounds and
``x dense`` the median of the per-round ratios dense / variant.

    python benchmarks/sparse_conv.py --threads 1       # -> results/sparse_conv_1thread.json
    python benchmarks/sparse_conv.py --threads 2       # -> results/sparse_conv_2threads.json
    python benchmarks/sparse_conv.py --quick           # small shapes, few rounds (checks the script)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, fwd_bwd, interleaved_medians, patched, training_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((64, 32), (128, 16), (256, 8))            # (channels, height = width)
SPARSITIES = (0.80, 0.90, 0.95, 0.98, 0.99)
QUICK_SHAPES, QUICK_SPARSITIES = ((16, 16), (32, 8)), (0.90, 0.98)
STEP_SPARSITIES, QUICK_STEP_SPARSITIES = (0.90, 0.95), (0.95,)
LAYER_VARIANTS = ("torch", "compiled", "sparseprop", "sparseprop_on")
STEP_BACKENDS = ("dense", "masked", "sparse", "sparse_torch")


# -- part 1: one convolution, all variants, in a worker process ---------------------------------
def layer_worker(threads: int, shapes, sparsities, batch: int, rounds: int) -> dict:
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    from regrow.nn import SparseConv2d, _conv_kernels, sparse_conv

    torch.set_num_threads(threads)
    kernels = _conv_kernels.load()
    try:
        from sparseprop.modules.conv2d import SparseConv2d as SPConv2d
        from sparseprop.modules.utils import from_sparse_format_conv2d
    except ImportError as e:   # optional peer
        SPConv2d, sp_status = None, f"sparseprop not importable ({e}); its columns are skipped"
    else:
        sp_status = "ok"

    def rel_err(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    out = {"threads": threads, "kernel": kernels is not None, "kernel_status": _conv_kernels.unavailable_reason() or "ok",
           "sparseprop": sp_status, "rows": []}
    gen = torch.Generator().manual_seed(0)
    for channels, hw in shapes:
        x = torch.randn(batch, channels, hw, hw, generator=gen).requires_grad_()
        g = torch.randn(batch, channels, hw, hw, generator=gen)
        for s in sparsities:
            sparse = SparseConv2d(channels, channels, 3, padding=1, bias=False, density=1.0 - s, seed=1)
            dense = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            with torch.no_grad():
                dense.weight.copy_(sparse.to_dense())
            rows, cols = sparse.row_indices.long(), sparse.col_indices.long()
            shape = tuple(dense.weight.shape)
            # (layer, its active-tap gradients in SparseConv2d's order) per variant
            layers = {"dense": (dense, lambda: dense.weight.grad.reshape(channels, -1)[rows, cols]),
                      "torch": (sparse, lambda: sparse.values.grad),
                      "compiled": (sparse, lambda: sparse.values.grad)}
            conversion_s = None
            if SPConv2d is not None:
                t = time.perf_counter()
                sp = SPConv2d(dense.weight.detach().clone(), padding=1, stride=1)
                conversion_s = time.perf_counter() - t
                sp_on = SPConv2d(dense.weight.detach().clone(), padding=1, stride=1, vectorizing_over_on=True)

                def sp_grad(layer):
                    full = from_sparse_format_conv2d(layer.W_val.grad, layer.W_idx, shape)
                    return full.reshape(channels, -1)[rows, cols]
                layers["sparseprop"] = (sp, lambda: sp_grad(sp))
                layers["sparseprop_on"] = (sp_on, lambda: sp_grad(sp_on))
            if kernels is None:
                del layers["compiled"]
            # the torch variant is SparseConv2d with its compiled kernels out of reach
            variants = {name: fwd_bwd(layer, x, g, lambda on=name == "torch": patched(
                            sparse_conv._conv_kernels, "load_for", lambda *tensors: None, on))
                        for name, (layer, _) in layers.items()}

            ref_y = variants["dense"]()
            ref_gx, ref_gw = x.grad.clone(), layers["dense"][1]().clone()
            errors = {}
            for name, fn in variants.items():
                if name != "dense":
                    y = fn()
                    errors[name] = max(rel_err(y, ref_y), rel_err(x.grad, ref_gx), rel_err(layers[name][1](), ref_gw))

            ms, x_dense = interleaved_medians(variants, rounds)
            row = {"shape": f"{channels}->{channels} at {hw}x{hw}", "channels": channels, "hw": hw, "sparsity": s,
                   "nnz": sparse.nnz, "max_rel_error": errors, "sparseprop_conversion_s": conversion_s,
                   "ms": ms, "x_dense": x_dense}
            out["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return out


# -- part 2: a ResNet-20 training step, one configuration per process ---------------------------
def step_worker(backend: str, sparsity: float, batch: int, steps: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from regrow.experiments.config import TrainConfig

    torch.set_num_threads(threads)
    dense = backend == "dense"
    config = TrainConfig(model="resnet20", dataset="synthetic", method="dense" if dense else "rigl",
                         sparsity=0.0 if dense else sparsity, backend="sparse" if backend.startswith("sparse") else "masked",
                         update_interval=steps + 10, threads=threads).validate()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(10, (batch,), generator=gen)
    model, dst, step = training_step(config, x, y, 10, total_steps=10 * (steps + 10))
    times = [step() for _ in range(steps + 2)][2:]   # two warm-up steps
    kinds = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in ("Conv2d", "SparseConv2d")})
    return {"backend": backend, "sparsity": 0.0 if dense else sparsity, "step_s": statistics.median(times),
            "step_s_all": times, "density": dst.stats()["density"], "conv_layers": kinds,
            "kernels_disabled": os.environ.get("REGROW_DISABLE_KERNEL", "")}


# -- driver --------------------------------------------------------------------------------------
def _run_worker(args: list[str], threads: int, extra_env: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), THP_MEM_ALLOC_ENABLE="1",
               **(extra_env or {}))
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker {' '.join(args)} ({threads} thread(s)) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_layer_table(res: dict) -> None:
    names = [n for n in LAYER_VARIANTS if any(n in row["ms"] for row in res["rows"])]
    print(f"\n{res['threads']} thread(s): fwd+bwd of one 3x3 conv; median ms (x faster than dense)")
    print(f"{'shape':>20} {'sparsity':>8} {'dense ms':>9} " + " ".join(f"{n:>20}" for n in names) + f" {'max rel err':>11}")
    for row in res["rows"]:
        cells = [f"{row['ms'][n]:8.2f} ({row['x_dense'][n]:5.2f}x)" if n in row["ms"] else "-" for n in names]
        err = max(row["max_rel_error"].values()) if row["max_rel_error"] else 0.0
        print(f"{row['shape']:>20} {row['sparsity']:>8.2f} {row['ms']['dense']:>9.2f} "
              + " ".join(f"{c:>20}" for c in cells) + f" {err:11.1e}")
    if res["sparseprop"] != "ok":
        print(f"  {res['sparseprop']}")
    if not res["kernel"]:
        print(f"  compiled kernels unavailable: {res['kernel_status']}")


def _print_step_table(threads: int, rows: list[dict]) -> list[dict]:
    print(f"\n{threads} thread(s): ResNet-20 training step, median s (masked / variant)")
    print(f"{'sparsity':>8} {'masked s':>9} {'sparse s':>9} {'speed-up':>8} {'sparse, torch routes s':>22} {'speed-up':>8}")
    dense = next(r for r in rows if r["backend"] == "dense")
    table = []
    for s in sorted({r["sparsity"] for r in rows if r["backend"] != "dense"}):
        cell = {b: next(r for r in rows if r["backend"] == b and r["sparsity"] == s) for b in STEP_BACKENDS[1:]}
        entry = {"threads": threads, "sparsity": s, "dense_step_s": dense["step_s"],
                 **{f"{b}_step_s": cell[b]["step_s"] for b in cell},
                 "speedup_sparse": cell["masked"]["step_s"] / cell["sparse"]["step_s"],
                 "speedup_sparse_torch": cell["masked"]["step_s"] / cell["sparse_torch"]["step_s"]}
        table.append(entry)
        print(f"{100 * s:>7g}% {entry['masked_step_s']:>9.3f} {entry['sparse_step_s']:>9.3f} "
              f"{entry['speedup_sparse']:>7.2f}x {entry['sparse_torch_step_s']:>22.3f} {entry['speedup_sparse_torch']:>7.2f}x")
    print(f"{'dense':>8} {dense['step_s']:>9.3f}")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, batch 16, few rounds: checks the script")
    ap.add_argument("--threads", default="1", help="thread count(s), comma-separated (one process each)")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds per layer configuration")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed ResNet-20 steps per configuration")
    ap.add_argument("--skip-step", action="store_true", help="part 1 only")
    ap.add_argument("--layer-worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--step-worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    shapes, sparsities = (QUICK_SHAPES, QUICK_SPARSITIES) if args.quick else (SHAPES, SPARSITIES)
    step_sparsities = QUICK_STEP_SPARSITIES if args.quick else STEP_SPARSITIES
    batch = args.batch or (16 if args.quick else 64)
    rounds = args.rounds or (3 if args.quick else 10)
    steps = args.steps or (2 if args.quick else 8)

    if args.layer_worker is not None:
        print(json.dumps(layer_worker(args.layer_worker, shapes, sparsities, batch, rounds)))
        return
    if args.step_worker is not None:
        backend, sparsity, threads = args.step_worker
        print(json.dumps(step_worker(backend, float(sparsity), batch, steps, int(threads))))
        return

    import torch
    started = time.perf_counter()
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "loadavg_start": os.getloadavg()}
    thread_counts = [int(t) for t in args.threads.split(",")]
    common = (["--quick"] if args.quick else []) + ["--batch", str(batch), "--rounds", str(rounds), "--steps", str(steps)]
    layer_results, step_rows, step_table = [], [], []
    for t in thread_counts:
        res = _run_worker(["--layer-worker", str(t), *common], t)
        layer_results.append(res)
        _print_layer_table(res)
        if args.skip_step:
            continue
        rows = []
        for backend in STEP_BACKENDS:
            for s in ([0.0] if backend == "dense" else step_sparsities):
                env = {"REGROW_DISABLE_KERNEL": "1"} if backend == "sparse_torch" else None
                row = _run_worker(["--step-worker", backend, str(s), str(t), *common], t, env)
                row["threads"] = t
                rows.append(row)
                print(f"  resnet20 {backend:>12} {100 * s:>4g}%: step {row['step_s']:.3f} s", file=sys.stderr, flush=True)
        step_rows += rows
        step_table += _print_step_table(t, rows)
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - started

    RESULTS.mkdir(exist_ok=True)
    tag = "-".join(map(str, thread_counts))
    name = f"sparse_conv{'_quick' if args.quick else ''}_{tag}thread{'' if thread_counts == [1] else 's'}.json"
    path = RESULTS / name
    path.write_text(json.dumps({
        "benchmark": "sparse_conv", "machine": info, "batch": batch, "rounds": rounds, "steps": steps,
        "note": "medians on a shared machine; x_dense = median of per-round ratios dense / variant",
        "sparseprop": layer_results[0]["sparseprop"] if layer_results else None,
        "layers": layer_results, "resnet20_step": {"rows": step_rows, "table": step_table}}, indent=1))
    print(f"\nwrote {path.relative_to(ROOT)} ({info['cpu']}, torch {info['torch']}, {info['date']})")


if __name__ == "__main__":
    main()
