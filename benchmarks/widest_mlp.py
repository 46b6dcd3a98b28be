"""The widest demo: a 1,000,000-wide hidden layer trained always-sparse on Fashion-MNIST.

784 -> W -> 10 MLP of SparseLinear layers (W = 1,000,000 by default): every hidden neuron has
``--fan-in`` pixel inputs, every output neuron ``--out-fan-in`` hidden inputs; GSE (uniform
sampling; or ``--method rigl``, ``dstee``, ``srigl``: growth by the full gradient, scanned in
blocks of rows) rewires both layers every ``--update-interval`` steps. A dense first layer alone
would hold 784M weights (3.1 GB, 9.4 GB with gradient and momentum) and a dense W x W layer
4 TB; here nothing of size out x in exists.

Training runs for a wall-clock budget: a few calibration steps measure the step time, the step
count for the schedules (update timing, drop fraction, learning rate) is planned from the
budget, and training stops when the budget is used. Reports peak RSS, median time of an
ordinary step and of an update step, samples seen and test accuracy.

    python benchmarks/widest_mlp.py --minutes 60    # the demo (about an hour) -> results/widest_mlp_2threads.json
    python benchmarks/widest_mlp.py --quick         # 1M wide, ~3 minutes, 2k test images -> widest_mlp_quick_2threads.json
    python benchmarks/widest_mlp.py --method rigl --minutes 25 --threads 1   # -> widest_mlp_rigl_1thread.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# torch's CPU allocator then asks for transparent huge pages on large tensors (it reads this
# once, so it is set before torch loads): far fewer TLB misses and page faults in the gathers
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import proc_status_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import regrow  # noqa: E402
import regrow.backends.sparse  # noqa: E402,F401  (imported up front: an hour-long run must not pick up edits made meanwhile)
from regrow.data import load  # noqa: E402
from regrow.nn import SparseLinear, _sparse_kernels  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build(width: int, fan_in: int, out_fan_in: int, seed: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), SparseLinear(784, width, fan_in=fan_in, seed=seed), nn.ReLU(inplace=True),
                         SparseLinear(width, 10, fan_in=min(out_fan_in, width), seed=seed + 1))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock training budget")
    ap.add_argument("--quick", action="store_true", help="3 minutes, updates every 10 steps, 2000 test images")
    ap.add_argument("--width", type=int, default=1_000_000)
    ap.add_argument("--fan-in", type=int, default=32, help="inputs per hidden neuron")
    ap.add_argument("--out-fan-in", type=int, default=250_000, help="hidden inputs per output neuron")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05, help="learning rate of the hidden layer")
    ap.add_argument("--out-lr", type=float, default=None,
                    help="learning rate of the output layer (default 500 / out-fan-in: its logits sum "
                         "out-fan-in terms, so a fixed rate diverges as the layer widens)")
    ap.add_argument("--update-interval", type=int, default=100)
    ap.add_argument("--method", default="gse", choices=["gse", "rigl", "dstee", "srigl", "set", "static"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=os.environ.get("REGROW_DATA", "/work/shared/data/fashion-mnist"))
    ap.add_argument("--test-images", type=int, default=None, help="evaluate on the first N test images")
    args = ap.parse_args()
    if args.quick:
        args.minutes, args.update_interval = 3.0, 10
        args.test_images = args.test_images or 2000
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    data = load("fashion-mnist", args.data_dir)
    x_train, y_train = data.train.get_batch(torch.arange(len(data.train)))
    x_test, y_test = data.test.get_batch(torch.arange(args.test_images or len(data.test)))
    x_train = x_train.flatten(1).contiguous()
    x_test = x_test.flatten(1).contiguous()
    kernels = _sparse_kernels.load()
    base_rss = proc_status_bytes("VmRSS")

    t = time.perf_counter()
    model = build(args.width, args.fan_in, args.out_fan_in, args.seed)
    build_s = time.perf_counter() - t
    hidden, out = model[1], model[3]
    out_lr = args.out_lr if args.out_lr is not None else 500.0 / out.nnz * out.out_features
    opt = torch.optim.SGD([{"params": hidden.parameters(), "lr": args.lr},
                           {"params": out.parameters(), "lr": out_lr}], lr=args.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(x_train), generator=gen)
    cursor = 0

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal order, cursor
        if cursor + args.batch > len(order):
            order, cursor = torch.randperm(len(x_train), generator=gen), 0
        idx = order[cursor:cursor + args.batch]
        cursor += args.batch
        return x_train[idx], y_train[idx]

    def train_step(step_fn) -> tuple[float, float]:
        xb, yb = batch()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        step_fn()
        return time.perf_counter() - t0, loss.item()

    # calibration: plain steps of the (static) sparse network, to plan the schedules
    calib = [train_step(opt.step) for _ in range(3)]
    step_s = statistics.median(c[0] for c in calib[1:])
    budget_s = args.minutes * 60 - (time.perf_counter() - started)
    total_steps = max(args.update_interval + 1, int(budget_s / (step_s * 1.15)))
    dst = regrow.DynamicSparsity(model, opt, method=args.method, sparsity=0.9, total_steps=total_steps,
                                 update_interval=args.update_interval)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    print(f"width {args.width}: {dst.stats()['nnz']:,} weights; calibration step {step_s:.2f} s; "
          f"planning {total_steps} steps in {budget_s / 60:.1f} min", flush=True)

    ordinary, updates, losses = [], [], [c[1] for c in calib]
    deadline = started + args.minutes * 60
    step = 0
    while step < total_steps and time.perf_counter() < deadline:
        step += 1
        due = dst.schedule.is_update(step)
        elapsed, loss = train_step(dst.step)
        sched.step()
        (updates if due else ordinary).append(elapsed)
        losses.append(loss)
        if step % 50 == 0 or due:
            print(f"step {step}/{total_steps} loss {statistics.fmean(losses[-50:]):.3f} "
                  f"{'update ' if due else ''}{elapsed:.2f} s, peak RSS {proc_status_bytes('VmHWM') / 2**30:.2f} GiB", flush=True)
    train_s = time.perf_counter() - started
    acc = accuracy(model, x_test, y_test, 1000)
    stats = dst.stats()
    result = {
        "benchmark": "widest_mlp", "method": args.method, "quick": args.quick,
        "machine": {"cpu": platform.processor(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads, "kernel": kernels is not None, "loadavg": os.getloadavg(),
                    "THP_MEM_ALLOC_ENABLE": os.environ["THP_MEM_ALLOC_ENABLE"],
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "config": vars(args),
        "layers": {n: {"shape": [m.out_features, m.in_features], "nnz": m.nnz, "density": m.density}
                   for n, m in model.named_modules() if isinstance(m, SparseLinear)},
        "dense_weights_would_be": sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, SparseLinear)),
        # the masked backend's floor for the same model: dense weight, gradient and momentum
        # (float32) and the mask (bool) of every layer, before any growth score
        "masked_bytes_at_least": 13 * sum(m.out_features * m.in_features for m in model.modules()
                                          if isinstance(m, SparseLinear)),
        "build_s": build_s,
        "steps": len(calib) + step, "planned_steps": total_steps, "samples": (len(calib) + step) * args.batch,
        "epochs": (len(calib) + step) * args.batch / len(x_train),
        "step_s_median": statistics.median(ordinary) if ordinary else None,
        "update_step_s_median": statistics.median(updates) if updates else None, "updates": stats["updates"],
        "wall_s": train_s, "peak_rss_gib": proc_status_bytes("VmHWM") / 2**30, "baseline_rss_gib": base_rss / 2**30,
        "final_train_loss": statistics.fmean(losses[-50:]), "test_accuracy": acc, "test_images": len(x_test),
        "itop_rate": stats["itop_rate"], "density": stats["density"],
    }
    try:
        with open("/proc/cpuinfo") as f:
            result["machine"]["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    RESULTS.mkdir(exist_ok=True)
    threads = f"{args.threads}thread" + ("s" if args.threads != 1 else "")
    method = "" if args.method == "gse" else f"_{args.method}"
    path = RESULTS / f"widest_mlp{method}{'_quick' if args.quick else ''}_{threads}.json"   # one file per method and thread count
    path.write_text(json.dumps(result, indent=1))
    print(f"\n{args.width:,}-wide hidden layer, {stats['nnz']:,} active weights "
          f"(dense: {result['dense_weights_would_be']:,}); {result['steps']} steps, "
          f"{result['epochs']:.2f} epochs in {train_s / 60:.1f} min")
    print(f"step {result['step_s_median']:.2f} s (update step {result['update_step_s_median'] or math.nan:.2f} s), "
          f"peak RSS {result['peak_rss_gib']:.2f} GiB, test accuracy {acc:.4f} on {len(x_test)} images, "
          f"ITOP {stats['itop_rate']:.2e}")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
