"""Inference speed of sparse linear layers and exported models: dense vs CSR vs condensed.

Layers: square linear layers (1024/4096/8192 wide) with SRigL-style constant fan-in masks at
80-99% sparsity, batch 1 and 256, 1 and 2 threads. Variants, all checked equal to the masked
dense layer before timing:

- ``dense``: ``F.linear`` with the masked dense weight (MKL).
- ``csr``: ``regrow.nn.CSRLinear`` (torch.sparse_csr, int32 indices; ``addmv`` at batch 1).
- ``csr_mm`` (batch 1 only): the same CSR weight through a matmul against a one-column
  matrix, the form PERF-NOTES timed.
- ``cond_torch``: ``CondensedLinear`` through ``F.embedding_bag`` (pure PyTorch).
- ``cond_kernel``: ``CondensedLinear`` through the compiled kernel (int16 indices).

Models: exported SRigL-style models (constant fan-in at 90%, 10% of neurons ablated) end to end:
a wide MLP and ResNet-20 (its convolutions stay dense; its head is condensed), formats dense /
csr / condensed. Conv: one 3x3 convolution, dense vs an unfold + condensed-kernel prototype, the
measurement behind ``export`` keeping convolutions dense.

The machine is shared and noisy: variants are interleaved round by round, each cell is the
median of many calls, and the table reports ratios measured side by side.

    python benchmarks/inference.py            # full run, writes benchmarks/results/inference.json
    python benchmarks/inference.py --quick    # a short run, writes inference_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import cpu_model  # noqa: E402
from regrow.export import export  # noqa: E402
from regrow.nn import CondensedLinear, CSRLinear  # noqa: E402
from regrow.nn import _kernels  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# -- timing -----------------------------------------------------------------------------------
def interleaved_medians(fns: dict[str, callable], rounds: int, budget_s: float) -> dict[str, float]:
    """Median seconds per call of each function, timing them in turn, round after round."""
    per_call = {}
    for name, fn in fns.items():  # warm up and calibrate
        fn()
        t = time.perf_counter()
        fn()
        per_call[name] = max(time.perf_counter() - t, 1e-7)
    reps = {n: max(1, min(200, int(budget_s / rounds / per_call[n]))) for n in fns}
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(reps[name]):
                t = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t)
    return {n: statistics.median(s) for n, s in samples.items()}


# -- layers -----------------------------------------------------------------------------------
def constant_fan_in_layer(width: int, sparsity: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = max(1, round(width * (1 - sparsity)))
    idx = torch.rand(width, width, generator=g).topk(k, dim=1).indices
    mask = torch.zeros(width, width, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    weight = torch.randn(width, width, generator=g) / k ** 0.5 * mask
    bias = torch.randn(width, generator=g)
    return weight, mask, bias


def layer_variants(weight, mask, bias, batch):
    csr = CSRLinear.from_dense(weight, mask, bias)
    cond_k = CondensedLinear.from_dense(weight, mask, bias)
    cond_t = CondensedLinear.from_dense(weight, mask, bias)
    cond_k.backend, cond_t.backend = "kernel", "torch"
    variants = {"dense": lambda x: F.linear(x, weight, bias), "csr": csr}
    if batch == 1:
        w_csr = csr.sparse_weight()
        variants["csr_mm"] = lambda x: torch.addmm(bias.unsqueeze(1), w_csr, x.t()).t()
    variants["cond_torch"] = cond_t
    if _kernels.load() is not None:
        variants["cond_kernel"] = cond_k
    return variants


def bench_layers(widths, sparsities, batches, threads_list, rounds, budget_s, log):
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for width in widths:
            for sparsity in sparsities:
                weight, mask, bias = constant_fan_in_layer(width, sparsity)
                for batch in batches:
                    x = torch.randn(batch, width)
                    variants = layer_variants(weight, mask, bias, batch)
                    with torch.no_grad():
                        ref = F.linear(x, weight, bias)
                        for name, fn in variants.items():
                            err = float((fn(x) - ref).abs().max())
                            if err > 1e-3 * max(1.0, float(ref.abs().max())):
                                raise AssertionError(f"{name} differs from dense by {err}")
                        med = interleaved_medians({n: (lambda f=f: f(x)) for n, f in variants.items()},
                                                  rounds, budget_s)
                    row = {"width": width, "sparsity": sparsity, "batch": batch, "threads": threads,
                           "ms": {n: 1e3 * t for n, t in med.items()}}
                    rows.append(row)
                    log(_layer_line(row))
                del weight, mask, bias
    return rows


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:5.2f}x" if a and b else "    -"


def _layer_line(row: dict) -> str:
    ms = row["ms"]
    best_csr = min(v for k, v in ms.items() if k.startswith("csr"))
    kern = ms.get("cond_kernel")
    return (f"t={row['threads']} b={row['batch']:<3d} n={row['width']:<4d} s={row['sparsity']:.2f}  "
            f"dense {ms['dense']:8.3f}  csr {ms['csr']:8.3f}  " +
            (f"csr_mm {ms['csr_mm']:8.3f}  " if "csr_mm" in ms else "") +
            f"cond_torch {ms['cond_torch']:8.3f}  cond_kernel {kern if kern else float('nan'):8.3f} ms  "
            f"kernel vs dense {_ratio(ms['dense'], kern)}  vs csr {_ratio(best_csr, kern)}")


def layer_table(rows: list[dict]) -> str:
    head = ("| threads | batch | width | sparsity | dense ms | csr ms | csr_mm ms | cond_torch ms | "
            "cond_kernel ms | kernel/dense | kernel/csr | kernel/csr_mm | torch-cond/dense |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        ms = r["ms"]
        kern = ms.get("cond_kernel")
        cells = [str(r["threads"]), str(r["batch"]), str(r["width"]), f"{100 * r['sparsity']:.0f}%",
                 f"{ms['dense']:.3f}", f"{ms['csr']:.3f}", f"{ms['csr_mm']:.3f}" if "csr_mm" in ms else "-",
                 f"{ms['cond_torch']:.3f}", f"{kern:.3f}" if kern else "-",
                 _ratio(ms["dense"], kern).strip(), _ratio(ms["csr"], kern).strip(),
                 _ratio(ms.get("csr_mm"), kern).strip(), _ratio(ms["dense"], ms["cond_torch"]).strip()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- whole models -----------------------------------------------------------------------------
def srigl_like_masks(model: nn.Module, sparsity: float, ablated: float, seed: int = 0) -> dict:
    """Constant fan-in masks for every weight of dim >= 2, ``ablated`` of the neurons removed."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        out, fan = p.shape[0], p[0].numel()
        k = max(1, round(fan * (1 - sparsity) / (1 - ablated)))  # the same non-zero budget
        live = torch.rand(out, generator=g) >= ablated
        live[0] = True
        idx = torch.rand(out, fan, generator=g).topk(min(k, fan), dim=1).indices
        mask = torch.zeros(out, fan, dtype=torch.bool).scatter_(1, idx, True) & live.unsqueeze(1)
        masks[name] = mask.view_as(p)
    return masks


def build_models(quick: bool):
    models = []
    widths = (1024, 1024) if quick else (2048, 2048, 2048)
    layers: list[nn.Module] = [nn.Flatten()]
    prev = 784
    for w in widths:
        layers += [nn.Linear(prev, w), nn.ReLU()]
        prev = w
    layers.append(nn.Linear(prev, 10))
    models.append((f"mlp 784-{'-'.join(map(str, widths))}-10", nn.Sequential(*layers), (1, 28, 28)))
    if not quick:
        try:
            from regrow.models import build
            models.append(("resnet20 (3x32x32)", build("resnet20", 10, (3, 32, 32)), (3, 32, 32)))
        except ImportError:
            pass
    return models


def bench_models(quick, batches, threads_list, rounds, budget_s, log):
    rows = []
    for name, model, in_shape in build_models(quick):
        masks = srigl_like_masks(model, 0.9, 0.1)
        exported = {fmt: export(model, masks, fmt) for fmt in ("dense", "csr", "condensed")}
        cond_torch = export(model, masks, "condensed")
        for m in cond_torch.modules():
            if isinstance(m, CondensedLinear):
                m.backend = "torch"
        exported["condensed_torch"] = cond_torch
        params = {fmt: sum(p.numel() for p in m.parameters()) for fmt, m in exported.items()}
        for threads in threads_list:
            torch.set_num_threads(threads)
            for batch in batches:
                x = torch.randn(batch, *in_shape)
                with torch.no_grad():
                    ref = exported["dense"](x)
                    for fmt, m in exported.items():
                        err = float((m(x) - ref).abs().max())
                        if err > 1e-3 * max(1.0, float(ref.abs().max())):
                            raise AssertionError(f"{name} {fmt} differs from dense by {err}")
                    med = interleaved_medians({f: (lambda m=m: m(x)) for f, m in exported.items()}, rounds, budget_s)
                row = {"model": name, "batch": batch, "threads": threads, "ms": {f: 1e3 * t for f, t in med.items()},
                       "params": params}
                rows.append(row)
                ms = row["ms"]
                log(f"{name} t={threads} b={batch}: " + "  ".join(f"{f} {v:.3f}" for f, v in ms.items()) +
                    f" ms  condensed vs dense {_ratio(ms['dense'], ms['condensed'])}")
    return rows


def model_table(rows):
    lines = ["| model | threads | batch | dense ms | csr ms | condensed ms | condensed (torch) ms | "
             "condensed/dense | condensed/csr | params dense -> condensed |", "|" + "---|" * 10]
    for r in rows:
        ms, p = r["ms"], r["params"]
        lines.append(f"| {r['model']} | {r['threads']} | {r['batch']} | {ms['dense']:.3f} | {ms['csr']:.3f} | "
                     f"{ms['condensed']:.3f} | {ms['condensed_torch']:.3f} | {_ratio(ms['dense'], ms['condensed']).strip()} | "
                     f"{_ratio(ms['csr'], ms['condensed']).strip()} | {p['dense']:,} -> {p['condensed']:,} |")
    return "\n".join(lines)


# -- convolution ------------------------------------------------------------------------------
def bench_conv(configs, threads_list, rounds, budget_s, log):
    """Dense conv vs im2col (F.unfold) + condensed kernel, the only condensed conv we could build."""
    rows = []
    kern = _kernels.load()
    if kern is None:
        return rows
    for channels, size, batch, sparsity in configs:
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        masks = srigl_like_masks(conv, sparsity, 0.0)
        with torch.no_grad():
            conv.weight.mul_(masks["weight"])
        cond = CondensedLinear.from_dense(conv.weight.flatten(1), masks["weight"].flatten(1))
        x = torch.randn(batch, channels, size, size)

        def condensed_conv(x=x, cond=cond):
            cols = F.unfold(x, 3, padding=1)                       # [B, C*9, H*W]
            y = cond(cols.transpose(1, 2).reshape(-1, cols.shape[1]))  # [B*H*W, C_out]
            return y.view(x.shape[0], size * size, -1).transpose(1, 2).reshape(x.shape[0], -1, size, size)

        for threads in threads_list:
            torch.set_num_threads(threads)
            with torch.no_grad():
                torch.testing.assert_close(condensed_conv(), conv(x), rtol=1e-4, atol=1e-4)
                med = interleaved_medians({"dense": lambda: conv(x), "condensed": condensed_conv}, rounds, budget_s)
            row = {"channels": channels, "size": size, "batch": batch, "sparsity": sparsity, "threads": threads,
                   "ms": {k: 1e3 * v for k, v in med.items()}}
            rows.append(row)
            log(f"conv {channels}ch {size}x{size} b={batch} s={sparsity} t={threads}: dense {row['ms']['dense']:.3f} "
                f"condensed {row['ms']['condensed']:.3f} ms ({_ratio(row['ms']['dense'], row['ms']['condensed'])})")
    return rows


def conv_table(rows):
    lines = ["| conv 3x3 | batch | sparsity | threads | dense ms | unfold+condensed ms | condensed/dense |",
             "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['channels']}ch {r['size']}x{r['size']} | {r['batch']} | {100 * r['sparsity']:.0f}% | "
                     f"{r['threads']} | {r['ms']['dense']:.3f} | {r['ms']['condensed']:.3f} | "
                     f"{_ratio(r['ms']['dense'], r['ms']['condensed']).strip()} |")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------
def machine() -> dict:
    kern = _kernels.load()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).date().isoformat(),
            "kernel": {"path": str(kern.path), "flags": kern.flags} if kern else _kernels.unavailable_reason()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (fewer sizes, rounds and models)")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default 1 2)")
    ap.add_argument("--widths", type=int, nargs="+", default=None, help="layer widths (default 1024 4096 8192)")
    ap.add_argument("--skip-models", action="store_true", help="layers only")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
    if args.quick:
        widths, sparsities, batches, threads, rounds, budget = [1024, 4096], [0.9, 0.99], [1, 256], [1], 3, 0.15
        conv_configs = [(64, 16, 1, 0.9)]
    else:
        widths, sparsities, batches, threads, rounds, budget = ([1024, 4096, 8192], [0.8, 0.9, 0.95, 0.98, 0.99],
                                                                [1, 256], [1, 2], 7, 1.0)
        conv_configs = [(16, 32, 1, 0.9), (64, 8, 1, 0.9), (64, 16, 1, 0.9), (64, 16, 64, 0.9), (64, 16, 1, 0.98)]
    threads = args.threads or threads
    widths = args.widths or widths
    if args.skip_models:
        conv_configs = []
    out = args.out or RESULTS / ("inference_quick.json" if args.quick else "inference.json")
    info = machine()
    print(f"# inference benchmark  {info['date']}  {info['cpu']}  {info['cores']} cores  torch {info['torch']}")
    print(f"# kernel: {info['kernel']}")
    t0 = time.time()
    layers = bench_layers(widths, sparsities, batches, threads, rounds, budget, print)
    models = [] if args.skip_models else bench_models(args.quick, batches, threads, rounds, budget, print)
    convs = bench_conv(conv_configs, threads, rounds, budget / 2, print)
    result = {"machine": info, "quick": args.quick, "seconds": time.time() - t0,
              "layers": layers, "models": models, "conv": convs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print()
    print(layer_table(layers))
    print()
    print(model_table(models))
    print()
    print(conv_table(convs))
    print(f"\nwrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
