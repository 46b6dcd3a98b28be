"""Peak memory (and time) of one RigL / DST-EE / SRigL topology update: always-sparse vs masked.

One square layer W x W with fan-in 64 (N = 64 W), batch 32, SGD with momentum:

- ``sparse``: ``SparseLinear(W, W, fan_in=64)``; the update reads the dense gradient
  delta^T h in blocks of output rows (regrow.core.row_blocks), never whole;
- ``masked``: ``nn.Linear(W, W)`` with a mask of the same N (dense weight, gradient, momentum,
  the update's gradient snapshot), run only while its weight fits (``--masked-max``).

Each (backend, method, width) runs in its own subprocess. "extra" is the peak RSS during the
update step (``VmHWM`` reset just before ``dst.step()`` of the update) above the RSS before it:
what the update itself costs on top of the model, optimizer and captured activations. The
log-log slope of extra memory vs width is fitted over the widths each backend ran. Times are
single runs on a shared machine (other jobs ran at the same time): indicative only; memory is
robust.

    python benchmarks/rigl_family_update.py            # widths 4k-64k -> results/rigl_family_update.json
    python benchmarks/rigl_family_update.py --quick    # widths 4k-8k, rigl only
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

FAN_IN, BATCH = 64, 32

_RUN = textwrap.dedent("""
    import json, sys, time, torch
    from torch import nn
    import regrow
    from regrow.nn import SparseLinear, _sparse_kernels

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

    backend, method, width, fan_in, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    _sparse_kernels.load()
    if backend == "sparse":
        layer = SparseLinear(width, width, fan_in=fan_in, seed=0)
    else:
        layer = nn.Linear(width, width)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9)
    sparsity = 1 - fan_in / width
    options = {"exempt_layers": ()} if method == "srigl" else {}
    dst = regrow.DynamicSparsity(layer, opt, method=method, sparsity=sparsity, total_steps=100,
                                 update_interval=2, distribution="uniform", **options)
    x = torch.randn(batch, width)
    for step in (1, 2):
        opt.zero_grad()
        loss = layer(x).square().mean()
        loss.backward()
        if step == 2:   # the update step
            base = status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            t = time.perf_counter()
        dst.step()
    seconds = time.perf_counter() - t
    print(json.dumps({"extra_bytes": status("VmHWM") - base, "update_s": seconds,
                      "nnz": dst.stats()["nnz"], "updates": dst.stats()["updates"]}))
""")


def run(backend: str, method: str, width: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _RUN, backend, method, str(width), str(FAN_IN), str(BATCH)],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{backend} {method} {width}: {out.stderr[-1500:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["updates"] == 1, res
    return res


def slope(points: list[tuple[int, float]]) -> float | None:
    if len(points) < 2:
        return None
    xs = [math.log(w) for w, _ in points]
    ys = [math.log(max(v, 1.0)) for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--masked-max", type=int, default=16384, help="widest masked layer to run")
    args = parser.parse_args()
    widths = [4096, 8192] if args.quick else [4096, 8192, 16384, 32768, 65536]
    methods = ["rigl"] if args.quick else ["rigl", "dstee", "srigl"]
    rows = []
    for method in methods:
        for width in widths:
            for backend in ("sparse", "masked"):
                if backend == "masked" and width > args.masked_max:
                    continue
                res = run(backend, method, width)
                rows.append({"method": method, "backend": backend, "width": width, **res})
                print(f"{method:6} {backend:6} W={width:6}  extra {res['extra_bytes'] / 2**20:9.1f} MiB  "
                      f"update {res['update_s']:7.2f} s", flush=True)
    slopes = {f"{m}/{b}": slope([(r["width"], r["extra_bytes"]) for r in rows if r["method"] == m and r["backend"] == b])
              for m in methods for b in ("sparse", "masked")}
    result = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "threads": 1, "fan_in": FAN_IN,
              "batch": BATCH, "growth_block_bytes": os.environ.get("REGROW_GROWTH_BLOCK_BYTES", "default"),
              "note": "single runs on a shared machine: times indicative only",
              "rows": rows, "memory_slopes": slopes}
    out = Path(__file__).resolve().parent / "results" / ("rigl_family_update_quick.json" if args.quick
                                                          else "rigl_family_update.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("log-log slope of extra memory vs width:", {k: None if v is None else round(v, 3) for k, v in slopes.items()})
    print("->", out)


if __name__ == "__main__":
    main()
