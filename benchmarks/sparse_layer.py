"""Training speed of one always-sparse layer: forward + backward of a 4096 x 4096 layer.

Batch 128, 90/95/98/99% sparsity (constant fan-in), 1 and 2 threads. Variants, each checked
against the masked dense layer before timing (output, input gradient, weight gradient):

- ``dense``: nn.Linear with the masked dense weight (MKL); the baseline of every ratio.
- ``sparse``: ``regrow.nn.SparseLinear`` on its compiled kernels (the default route).
- ``torch_sparse``: the same layer on its fallback route (torch.sparse CSR matmuls and
  ``sampled_addmm``), i.e. what plain PyTorch gives.
- ``sparseprop``: SparseProp's ``SparseLinear`` (PyPI ``sparseprop``, IST-DASLab), if installed:
  an optional extra, ``pip install pybind11 && pip install --no-build-isolation sparseprop``.

Each thread count runs in its own subprocess (OMP_NUM_THREADS / MKL_NUM_THREADS set before
torch and SparseProp's OpenMP start). The machine is shared and noisy: variants are timed in
turn, round after round; a cell is the median over rounds, and ``x dense`` is the median of
the per-round ratios dense / variant.

    python benchmarks/sparse_layer.py            # full run -> benchmarks/results/sparse_layer.json
    python benchmarks/sparse_layer.py --quick    # 98% only, few rounds -> sparse_layer_quick.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    import torch
    from _common import cpu_model
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "loadavg_start": os.getloadavg()}


# -- one thread count, in a worker process -----------------------------------------------------
def worker(threads: int, sparsities: list[float], rounds: int, width: int, batch: int) -> dict:
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    from _common import fwd_bwd, interleaved_medians, patched
    from regrow.nn import _sparse_kernels
    from regrow.nn.sparse_linear import SparseLinear

    torch.set_num_threads(threads)
    kernels = _sparse_kernels.load()
    try:
        from sparseprop.modules.linear import SparseLinear as SPLinear
    except ImportError as e:   # optional peer
        SPLinear, sp_error = None, f"sparseprop not importable: {e}"
    else:
        sp_error = None

    out = {"threads": threads, "kernel": kernels is not None, "sparseprop": sp_error or "ok", "rows": []}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, width, generator=gen).requires_grad_()
    g = torch.randn(batch, width, generator=gen)
    for s in sparsities:
        sparse = SparseLinear(width, width, 1.0 - s, seed=1)
        dense = nn.Linear(width, width)
        with torch.no_grad():
            dense.weight.copy_(sparse.to_dense())
            dense.bias.copy_(sparse.bias)
        rows, cols = sparse.row_indices.long(), sparse.col_indices.long()
        # (layer, its weight gradient in CSR order) per variant
        layers = {"dense": (dense, lambda: dense.weight.grad[rows, cols]),
                  "sparse": (sparse, lambda: sparse.values.grad),
                  "torch_sparse": (sparse, lambda: sparse.values.grad)}
        conversion_s = None
        if SPLinear is not None:
            t = time.perf_counter()
            sp = SPLinear(dense.weight.detach().clone(), bias=nn.Parameter(dense.bias.detach().clone()))
            conversion_s = time.perf_counter() - t
            layers["sparseprop"] = (sp, lambda: sp.W_val.grad)   # SparseProp stores CSR order too
        # the torch.sparse variant is SparseLinear with its compiled kernels switched off
        variants = {name: fwd_bwd(layer, x, g, lambda on=name == "torch_sparse": patched(
                        _sparse_kernels, "load", lambda: None, on))
                    for name, (layer, _) in layers.items()}

        # correctness: output, input gradient and weight gradient against the dense layer
        ref_y = variants["dense"]()
        ref_gx, ref_gw = x.grad.clone(), layers["dense"][1]().clone()
        errors = {}
        for name, fn in variants.items():
            if name != "dense":
                y = fn()
                errors[name] = max(float((y - ref_y).abs().max()), float((x.grad - ref_gx).abs().max()),
                                   float((layers[name][1]() - ref_gw).abs().max()))

        ms, x_dense = interleaved_medians(variants, rounds)
        row = {"sparsity": s, "nnz": sparse.nnz, "max_abs_error": errors, "sparseprop_conversion_s": conversion_s,
               "ms": ms, "x_dense": x_dense}
        out["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return out


# -- driver --------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="98%% sparsity only, few rounds")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (one process each)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sparsities", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sparsities = [0.98] if args.quick else [0.90, 0.95, 0.98, 0.99]
    if args.sparsities:
        sparsities = [float(s) for s in args.sparsities.split(",")]
    rounds = args.rounds or (5 if args.quick else 25)

    if args.worker is not None:
        print(json.dumps(worker(args.worker, sparsities, rounds, args.width, args.batch)))
        return

    info = machine()
    results = []
    for t in [int(v) for v in args.threads.split(",")]:
        env = dict(os.environ, OMP_NUM_THREADS=str(t), MKL_NUM_THREADS=str(t))
        cmd = [sys.executable, __file__, "--worker", str(t), "--rounds", str(rounds), "--width", str(args.width),
               "--batch", str(args.batch), "--sparsities", ",".join(map(str, sparsities))]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"worker with {t} thread(s) failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    info["loadavg_end"] = os.getloadavg()

    names = ["sparse", "torch_sparse", "sparseprop"]
    print(f"fwd+bwd of a {args.width} x {args.width} layer, batch {args.batch}; median ms (x faster than dense, "
          f"median of per-round ratios); {info['cpu']}, torch {info['torch']}, {info['date']}")
    print(f"{'threads':>7} {'sparsity':>8} {'dense ms':>9} " + " ".join(f"{n:>22}" for n in names) + f" {'max err':>8}")
    for res in results:
        for row in res["rows"]:
            cells = []
            for n in names:
                cells.append(f"{row['ms'][n]:9.2f} ({row['x_dense'][n]:5.2f}x)" if n in row["ms"] else f"{'-':>22}")
            err = max(row["max_abs_error"].values())
            print(f"{res['threads']:>7} {row['sparsity']:>8.2f} {row['ms']['dense']:>9.2f} "
                  + " ".join(f"{c:>22}" for c in cells) + f" {err:8.1e}")
        if res["sparseprop"] != "ok":
            print(f"  ({res['threads']} thread(s): {res['sparseprop']})")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("sparse_layer_quick.json" if args.quick else "sparse_layer.json")
    path.write_text(json.dumps({"benchmark": "sparse_layer", "machine": info, "width": args.width, "batch": args.batch,
                                "rounds": rounds, "results": results}, indent=1))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
