"""The whole GPU check in one run: the GPU test suite, then the GPU benchmarks (docs/gpu.md).

A session with a GPU runs this once; everything lands in one JSON file (written after each
part, so a run cut short keeps what it finished) plus the test log:

* ``tests``: ``pytest -m gpu tests/gpu`` on the device (pass/fail counts, the log's tail).
* ``engine_overhead``: a training step with the masked engine (RigL, 90%, ordinary steps) vs
  plain dense training, ResNet-18 and ViT on 3x32x32 inputs, batch 128, bf16 autocast, SGD.
  Goal: at most 5% more time per step.
* ``rigl_update``: the time of a RigL update step (gradient snapshot, finiteness check, drop
  and grow in every layer) against an ordinary step of the same run.
* ``condensed``: CondensedLinear vs dense vs CSR at 90% sparsity (constant fan-in), batch 256
  (and 1), widths 1024/4096/8192, fp32; every variant checked equal to dense first.
  Goal: ahead of both (SRigL reports 1.7x over dense and 13x over CSR on a Titan V).
* ``sparse_linear``: SparseLinear forward+backward vs nn.Linear at 90/95/98/99% sparsity,
  batch 128, 4096 wide, fp32 (dense also with TF32 and bf16, for reference); host syncs per
  forward+backward counted.
* ``ddp``: recorded as not run when fewer than two GPUs are visible.

    python benchmarks/gpu_suite.py                          # on the GPU machine
    python benchmarks/gpu_suite.py --out-dir "$OUT"         # results where the device tool fetches them
    python benchmarks/gpu_suite.py --device cpu --quick     # smoke check of this script, tiny sizes

Timings on CUDA are medians of CUDA-event-timed blocks, variants interleaved round by round.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import regrow  # noqa: E402
from regrow.models import build  # noqa: E402
from regrow.nn import CondensedLinear, CSRLinear, SparseLinear, _triton_kernels, sparsify  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# -- plumbing ---------------------------------------------------------------------------------
class Report:
    """One JSON document, rewritten after every part."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def block_seconds(fn, n: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``n`` back-to-back calls (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / n
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def interleaved(fns: dict, device: torch.device, rounds: int, target_s: float, warmup: int = 3) -> dict:
    """Median seconds per call of each function, the variants timed in turn, round by round;
    each block holds enough calls to last about ``target_s``."""
    per_call = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        sync(device)
        per_call[name] = max(block_seconds(fn, 1, device), 1e-6)
    reps = {n: max(1, min(500, int(target_s / per_call[n]))) for n in fns}
    samples = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(block_seconds(fn, reps[name], device))
    return {n: statistics.median(s) for n, s in samples.items()}


def count_syncs(fn, device: torch.device) -> int | None:
    """Host-device synchronisations during one call of ``fn`` (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # not torch's one-time notice that sync debug mode "does not yet detect all synchronizing operations"
    return sum("called a synchronizing" in str(w.message) for w in caught)


def environment(device: torch.device) -> dict:
    env = {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": str(device),
           "tf32_matmul_default": torch.backends.cuda.matmul.allow_tf32}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_count=torch.cuda.device_count(),
                   capability=f"{props.major}.{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version())
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


# -- 1. the GPU test suite --------------------------------------------------------------------
def run_tests(device: torch.device, out_dir: Path, quick: bool, keyword: str | None, timeout_s: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"]
    if keyword is None and quick:
        keyword = "(mlp and sgd and fp32) or test_layers or (test_export and mlp)"
    if keyword:
        cmd += ["-k", keyword]
    if device.type == "cuda" and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "8"]   # one GPU, eight processes: the tiny models leave it mostly idle
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "300"]
    env = dict(os.environ, REGROW_TEST_DEVICE=str(device), PYTHONUNBUFFERED="1")
    log(f"tests: {' '.join(cmd)}")
    t0 = time.perf_counter()
    log_path = out_dir / "gpu_tests.log"
    # the log is written as the tests run (a run cut short keeps it); pytest and its xdist
    # workers get a process group of their own, so a timeout stops all of them
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                process_group=0)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    if rc is None:
        with open(log_path, "a") as log_file:
            log_file.write(f"\n[gpu_suite] tests stopped after {timeout_s} s\n")
    output = log_path.read_text()
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", output)}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.M)
    result = {"command": " ".join(cmd), "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
              "counts": counts, "failed": failed[:50], "tail": output[-3000:]}
    log(f"tests: rc={rc} {counts} in {result['seconds']} s")
    return result


# -- 2. masked-engine overhead and RigL's update step -----------------------------------------
def model_specs(quick: bool) -> dict:
    if quick:
        return {"resnet18": ((3, 8, 8), {"width": 0.0625}), "vit": ((3, 8, 8), {"dim": 16, "depth": 1, "heads": 2})}
    # ResNet-18 as in the DST papers (CIFAR variant); a ViT-Tiny-like ViT on 32x32 (patch 4: 64 tokens)
    return {"resnet18": ((3, 32, 32), {}),
            "vit": ((3, 32, 32), {"patch_size": 4, "dim": 192, "depth": 6, "heads": 3, "mlp_ratio": 4.0})}


class Trainer:
    """One model + SGD, stepping either plainly or through DynamicSparsity."""

    def __init__(self, name, in_shape, options, device, batch, method=None, update_interval=100,
                 total_steps=10_000, sparsity=0.9, always_sparse=False, autocast=torch.bfloat16):
        torch.manual_seed(0)
        self.model = build(name, 10, in_shape, **options)
        if always_sparse:   # as `regrow train --backend sparse` converts it
            sparsify(self.model, sparsity, seed=0)
        self.model.to(device)
        self.device, self.autocast = device, autocast
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.dst = None if method is None else regrow.DynamicSparsity(
            self.model, self.opt, method=method, sparsity=sparsity, total_steps=total_steps,
            update_interval=update_interval, stop_fraction=1.0)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, *in_shape, generator=g).to(device)
        self.y = torch.randint(0, 10, (batch,), generator=g).to(device)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                            enabled=self.autocast is not None):
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        if self.dst is None:
            self.opt.step()
        else:
            self.dst.step()


def bench_engine_overhead(device, quick, rounds, target_s) -> list[dict]:
    batch = 8 if quick else 128
    rows = []
    for name, (in_shape, options) in model_specs(quick).items():
        # update_interval beyond the timed steps: every timed step is an ordinary one
        dense = Trainer(name, in_shape, options, device, batch)
        static = Trainer(name, in_shape, options, device, batch, method="static")
        rigl = Trainer(name, in_shape, options, device, batch, method="rigl", update_interval=1_000_000,
                       total_steps=10_000_000)
        med = interleaved({"dense": dense.step, "static": static.step, "rigl": rigl.step}, device, rounds, target_s)
        row = {"model": name, "batch": batch, "precision": "bf16 autocast", "optimizer": "SGD momentum",
               "sparsity": 0.9, "ms_per_step": {k: round(v * 1e3, 4) for k, v in med.items()},
               "overhead_pct": {k: round(100 * (med[k] / med["dense"] - 1), 2) for k in ("static", "rigl")}}
        # host syncs of one ordinary dst.step() (forward/backward done outside the count)
        rigl.opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            F.cross_entropy(rigl.model(rigl.x), rigl.y).backward()
        row["step_syncs"] = count_syncs(rigl.dst.step, device)
        row["goal_overhead_pct"], row["goal_met"] = 5.0, row["overhead_pct"]["rigl"] <= 5.0
        rows.append(row)
        log(f"engine {name}: {row['ms_per_step']} ms/step, overhead {row['overhead_pct']} %")
        del dense, static, rigl
    return rows


def bench_rigl_update(device, quick, steps) -> list[dict]:
    batch = 8 if quick else 128
    rows = []
    for name, (in_shape, options) in model_specs(quick).items():
        run = Trainer(name, in_shape, options, device, batch, method="rigl", update_interval=4, total_steps=10_000)
        for _ in range(4):
            run.step()
        times = {"update": [], "ordinary": []}
        for _ in range(steps):
            kind = "update" if run.dst.schedule.is_update(run.dst.step_count + 1) else "ordinary"
            sync(device)
            t = time.perf_counter()
            run.step()
            sync(device)
            times[kind].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"model": name, "batch": batch, "sparsity": 0.9, "update_interval": 4,
               "ms": {k: round(v * 1e3, 3) for k, v in med.items()},
               "update_cost_ms": round((med["update"] - med["ordinary"]) * 1e3, 3),
               "samples": {k: len(v) for k, v in times.items()},
               "layers": len(run.dst.targets), "sparsified_weights": sum(t.numel for t in run.dst.targets)}
        rows.append(row)
        log(f"rigl update {name}: {row['ms']} ms, update costs {row['update_cost_ms']} ms")
    return rows


# -- 3. inference layers: condensed vs dense vs CSR -------------------------------------------
def constant_fan_in_layer(width: int, sparsity: float, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = max(1, round(width * (1 - sparsity)))
    idx = torch.rand(width, width, generator=g).topk(k, dim=1).indices
    mask = torch.zeros(width, width, dtype=torch.bool).scatter_(1, idx, True)
    weight = torch.randn(width, width, generator=g) / k ** 0.5 * mask
    return weight.to(device), mask.to(device), torch.randn(width, generator=g).to(device)


def _with_tf32(fn):
    """``fn`` with TF32 matmuls allowed (torch's default for float32 is off)."""
    def run():
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return fn()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
    return run


def bench_condensed(device, quick, rounds, target_s) -> list[dict]:
    widths = (256,) if quick else (1024, 4096, 8192)
    rows = []
    for width in widths:
        weight, mask, bias = constant_fan_in_layer(width, 0.9, device)
        csr = CSRLinear.from_dense(weight, mask, bias)
        cond = CondensedLinear.from_dense(weight, mask, bias)
        for batch in (256, 1):
            x = torch.randn(batch, width, device=device)
            x16, w16, b16 = x.to(torch.bfloat16), weight.to(torch.bfloat16), bias.to(torch.bfloat16)
            fns = {"dense_fp32": lambda: F.linear(x, weight, bias),
                   "dense_tf32": _with_tf32(lambda: F.linear(x, weight, bias)),
                   "dense_bf16": lambda: F.linear(x16, w16, b16),
                   "csr": lambda: csr(x), "condensed": lambda: cond(x)}
            with torch.no_grad():
                ref = F.linear(x, weight, bias)
                for n in ("csr", "condensed"):
                    torch.testing.assert_close(fns[n](), ref, rtol=1e-4, atol=1e-4)
                med = interleaved(fns, device, rounds, target_s)
            row = {"width": width, "sparsity": 0.9, "batch": batch, "fan_in": cond.fan_in,
                   "us": {n: round(t * 1e6, 3) for n, t in med.items()},
                   "condensed_speedup": {n: round(med[n] / med["condensed"], 3)
                                         for n in ("dense_fp32", "dense_tf32", "dense_bf16", "csr")}}
            if batch == 256:
                row["goal_met"] = med["condensed"] < min(med["dense_fp32"], med["csr"])
            rows.append(row)
            log(f"condensed w={width} b={batch}: {row['us']} us; condensed speedup {row['condensed_speedup']}")
    return rows


# -- 4. always-sparse training layer: SparseLinear vs dense -----------------------------------
def bench_sparse_linear(device, quick, rounds, target_s) -> list[dict]:
    width, batch = (256, 8) if quick else (4096, 128)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, width, generator=g).to(device)
    gy = torch.randn(batch, width, generator=g).to(device)
    dense = nn.Linear(width, width).to(device)

    def dense_step(dtype=None):
        def run():
            x = x0.detach().requires_grad_()
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                y = dense(x)
            y.backward(gy.to(y.dtype))
        return run

    dense_fns = {"dense_fp32": dense_step(), "dense_tf32": _with_tf32(dense_step()),
                 "dense_bf16": dense_step(torch.bfloat16)}
    rows = []
    for sparsity in (0.90, 0.95, 0.98, 0.99):
        layer = SparseLinear(width, width, 1 - sparsity, seed=1).to(device)

        def on_route(fn, name):
            """``fn`` with SparseLinear's CUDA route set to ``name`` (triton or torch.sparse)."""
            def run():
                saved = os.environ.get("REGROW_CUDA_SPARSE")
                os.environ["REGROW_CUDA_SPARSE"] = name
                try:
                    return fn()
                finally:
                    if saved is None:
                        del os.environ["REGROW_CUDA_SPARSE"]
                    else:
                        os.environ["REGROW_CUDA_SPARSE"] = saved
            return run

        def sparse_step(layer=layer):
            x = x0.detach().requires_grad_()
            layer(x).backward(gy)

        def sparse_forward(layer=layer):
            with torch.no_grad():
                layer(x0)
        routes = ["torch"] + (["triton"] if device.type == "cuda" and _triton_kernels.route() == "triton" else [])
        fns = {}
        for r in routes:
            # the layer against its own dense equivalent (values and gradients), once, before timing
            x1, x2 = x0.detach().requires_grad_(), x0.detach().requires_grad_()
            w = layer.to_dense().detach().requires_grad_()
            layer.values.grad = None
            y = on_route(lambda: layer(x1), r)()
            torch.testing.assert_close(y, F.linear(x2, w, layer.bias), rtol=1e-3, atol=1e-3)
            on_route(lambda: y.backward(gy), r)()
            F.linear(x2, w, layer.bias).backward(gy)
            torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(layer.values.grad, w.grad.reshape(-1)[layer.active_keys()], rtol=1e-3, atol=1e-3)
            fns[f"sparse_fwd_bwd_{r}"] = on_route(sparse_step, r)
            fns[f"sparse_fwd_{r}"] = on_route(sparse_forward, r)
        med = interleaved({**fns, **dense_fns}, device, rounds, target_s)
        best = min(routes, key=lambda r: med[f"sparse_fwd_bwd_{r}"])
        med["sparse_fwd_bwd"] = med[f"sparse_fwd_bwd_{best}"]
        row = {"width": width, "batch": batch, "sparsity": sparsity, "nnz": layer.nnz,
               "path": "compiled CPU kernels" if device.type != "cuda" else
               {"torch": "cuSPARSE via torch.sparse", "triton": "Triton kernels"}[best],
               "routes_timed": routes,
               "ms": {n: round(t * 1e3, 4) for n, t in med.items()},
               "speedup_vs_dense": {n: round(med[n] / med["sparse_fwd_bwd"], 3)
                                    for n in ("dense_fp32", "dense_tf32", "dense_bf16")},
               "syncs_per_fwd_bwd": count_syncs(on_route(sparse_step, best), device)}
        rows.append(row)
        log(f"sparse_linear {sparsity:.0%}: {row['ms']} ms; speedup {row['speedup_vs_dense']}; "
            f"syncs {row['syncs_per_fwd_bwd']}")
    return rows


# -- 5. always-sparse ViT step and the RigL update of a wide SparseLinear ------------------------
def peak_step(fn, device) -> tuple[float, float | None]:
    """Seconds of one call of ``fn`` and the peak device memory it allocated above what was
    allocated before it (GiB; None on the CPU)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - t
    if device.type != "cuda":
        return seconds, None
    return seconds, (torch.cuda.max_memory_allocated(device) - base) / 2**30


def bench_always_sparse_vit(device, quick, rounds, target_s) -> list[dict]:
    """The ViT of ``engine_overhead`` trained with RigL, masked vs always-sparse (sparsify: q, k, v,
    output and feed-forward projections as SparseLinear, patch embedding as SparseConv2d), fp32
    (SparseLinear computes in fp32 under autocast too; masked bf16 for reference)."""
    in_shape, options = model_specs(quick)["vit"]
    batch = 8 if quick else 128
    rows = []
    for sparsity in ((0.9,) if quick else (0.9, 0.95, 0.98)):
        runs = {"masked_fp32": Trainer("vit", in_shape, options, device, batch, "rigl", 1_000_000, 10_000_000,
                                       sparsity, autocast=None),
                "sparse_fp32": Trainer("vit", in_shape, options, device, batch, "rigl", 1_000_000, 10_000_000,
                                       sparsity, always_sparse=True, autocast=None),
                "masked_bf16": Trainer("vit", in_shape, options, device, batch, "rigl", 1_000_000, 10_000_000,
                                       sparsity)}
        med = interleaved({k: r.step for k, r in runs.items()}, device, rounds, target_s)
        peak = {}
        for k, r in runs.items():   # memory of one step of each, alone
            peak[k] = peak_step(r.step, device)[1]
        row = {"model": "vit", "options": options, "batch": batch, "sparsity": sparsity,
               "ms_per_step": {k: round(v * 1e3, 3) for k, v in med.items()},
               "sparse_speedup_vs_masked_fp32": round(med["masked_fp32"] / med["sparse_fp32"], 3),
               "step_peak_gib": {k: None if v is None else round(v, 3) for k, v in peak.items()},
               "params_gib": {k: round(sum(p.numel() * p.element_size() for p in r.model.parameters()) / 2**30, 4)
                              for k, r in runs.items()}}
        rows.append(row)
        log(f"always-sparse vit {sparsity:.0%}: {row['ms_per_step']} ms/step, sparse/masked fp32 speedup "
            f"{row['sparse_speedup_vs_masked_fp32']}, peak {row['step_peak_gib']} GiB")
        del runs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_sparse_update(device, quick) -> list[dict]:
    """One RigL update step of a square layer W x W at fan-in 16 (batch 32, SGD momentum):
    SparseLinear (the dense gradient read in blocks of rows, never whole) vs nn.Linear + mask
    (where its dense weight fits comfortably). Peak device memory of the update step above what
    was allocated before it, and its time against an ordinary step."""
    widths = (512, 1024) if quick else (8192, 32768, 65536)
    masked_max = 1024 if quick else 32768
    fan_in, batch = 16, 32
    rows = []
    for width in widths:
        for backend in ("sparse", "masked"):
            if backend == "masked" and width > masked_max:
                continue
            torch.manual_seed(0)
            layer = (SparseLinear(width, width, fan_in=fan_in, seed=0) if backend == "sparse"
                     else nn.Linear(width, width))
            model = nn.Sequential(layer).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            dst = regrow.DynamicSparsity(model, opt, method="rigl", sparsity=1 - fan_in / width, total_steps=1000,
                                         update_interval=3, stop_fraction=1.0, distribution="uniform")
            g = torch.Generator().manual_seed(0)
            x = torch.randn(batch, width, generator=g).to(device)
            target = torch.randn(batch, width, generator=g).to(device)

            def step():
                opt.zero_grad(set_to_none=True)
                F.mse_loss(model(x), target).backward()
                dst.step()
            ordinary = []
            for _ in range(2):
                ordinary.append(peak_step(step, device))
            update = peak_step(step, device)   # step 3: the update
            assert dst.stats()["updates"] == 1, dst.stats()
            row = {"backend": backend, "width": width, "fan_in": fan_in, "batch": batch, "nnz": fan_in * width,
                   "update_ms": round(update[0] * 1e3, 2), "ordinary_ms": round(ordinary[-1][0] * 1e3, 2),
                   "update_peak_gib": None if update[1] is None else round(update[1], 4),
                   "ordinary_peak_gib": None if ordinary[-1][1] is None else round(ordinary[-1][1], 4)}
            rows.append(row)
            log(f"rigl update {backend} {width}: {row}")
            del model, opt, dst, layer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# -- main -------------------------------------------------------------------------------------
PARTS = ("engine_overhead", "rigl_update", "condensed", "sparse_linear", "always_sparse_vit", "sparse_update",
         "tests", "ddp")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: checks the script runs")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    ap.add_argument("--tests-k", default=None, help="a pytest -k expression for the test part")
    ap.add_argument("--tests-timeout", type=int, default=330, help="seconds before the test part is stopped")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; use --device cpu --quick to check the script", file=sys.stderr)
        return 2
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    name = "gpu_suite" if device.type == "cuda" else f"gpu_suite_{device.type}"
    out = Report(args.out_dir / (name + ("_quick" if args.quick else "") + ".json"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rounds, target_s = (2, 0.002) if args.quick else (7, 0.05)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out.put("environment", environment(device))
    out.put("settings", {"quick": args.quick, "rounds": rounds, "block_target_s": target_s, "parts": parts})
    t0 = time.perf_counter()
    status = 0
    for part in parts:
        log(f"== {part} ({time.perf_counter() - t0:.0f} s in)")
        try:
            if part == "tests":
                result = run_tests(device, args.out_dir, args.quick, args.tests_k, args.tests_timeout)
                status |= 0 if result["returncode"] == 0 else 1
            elif part == "engine_overhead":
                result = bench_engine_overhead(device, args.quick, rounds, target_s)
            elif part == "rigl_update":
                result = bench_rigl_update(device, args.quick, steps=12 if args.quick else 60)
            elif part == "condensed":
                result = bench_condensed(device, args.quick, rounds, target_s)
            elif part == "sparse_linear":
                result = bench_sparse_linear(device, args.quick, rounds, target_s)
            elif part == "always_sparse_vit":
                result = bench_always_sparse_vit(device, args.quick, rounds, target_s)
            elif part == "sparse_update":
                result = bench_sparse_update(device, args.quick)
            else:
                n = torch.cuda.device_count() if device.type == "cuda" else 0
                result = {"ran": False, "gpus": n,
                          "reason": "DDP with nccl needs two or more GPUs; this machine has "
                                    f"{n} visible" if n < 2 else "not implemented in this script yet"}
        except Exception as err:   # keep going: the other parts' numbers are still worth having
            status |= 1
            result = {"error": f"{type(err).__name__}: {err}"}
            log(f"{part} FAILED: {result['error']}")
        out.put(part, result)
    out.put("total_seconds", round(time.perf_counter() - t0, 1))
    log(f"wrote {out.path} ({out.data['total_seconds']} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
