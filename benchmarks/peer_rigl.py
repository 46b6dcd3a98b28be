"""regrow's RigL against the PyPI package rigl-torch 0.5.2 on LeNet-300-100.

Same network (regrow.models mlp 784-300-100-10, identical initial weights), data (MNIST from
/work/shared/data/mnist, or scikit-learn digits with --quick), batch order, optimizer (SGD,
momentum 0.9, Nesterov, weight decay 5e-4), cosine LR per step, RigL schedule (dT, alpha 0.3,
cosine drop fraction, updates stop at 75% of training), seed and uniform distribution (rigl-torch's
only one). Variants, trained in lockstep on the same batches so machine noise hits them alike:

- ``dense``: plain training (the time reference);
- ``regrow``: ``DynamicSparsity(method="rigl", distribution="uniform")``, every layer at the density;
- ``regrow_fc1_dense``: the same with the first layer kept dense, the allocation rigl-torch ends up with;
- ``rigl_torch``: ``RigLScheduler(dense_allocation=1 - sparsity, ignore_linear_layers=False)``,
  called as its README says (``if scheduler(): optimizer.step()``).

rigl-torch's quirks, handled here: it imports torchvision only for isinstance checks against
ResNet blocks, and torchvision's wheel does not load on this CPU build of torch, so a minimal
stand-in package goes on sys.path when the real one cannot be imported; its RigLScheduler wraps
``optimizer.step``, so it is created after the LR scheduler; with the uniform distribution it
keeps the first layer dense; at an update step it skips ``optimizer.step()``.

Reported per variant: final test accuracy (mean ± std over seeds; per epoch in the JSON), overall and first-layer density, median
time per training step (ms; the update steps included as they fall) and its ratio to dense.

    python benchmarks/peer_rigl.py             # MNIST, 3 epochs -> results/peer_rigl.json
    python benchmarks/peer_rigl.py --quick     # digits, small MLP -> results/peer_rigl_quick.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from regrow import DynamicSparsity  # noqa: E402
from regrow.data import load  # noqa: E402
from regrow.models import build  # noqa: E402
from regrow.train import epoch_order, evaluate  # noqa: E402

VARIANTS = ("dense", "regrow", "regrow_fc1_dense", "rigl_torch")

_STANDIN = {
    "torchvision/__init__.py": '"""Stand-in: rigl_torch only needs torchvision.models.resnet block types."""\n'
                               "from . import models\n",
    "torchvision/models/__init__.py": "from . import resnet\n",
    "torchvision/models/resnet.py": "class BasicBlock:\n    pass\n\n\nclass Bottleneck:\n    pass\n",
}


def import_rigl_torch():
    """rigl_torch.RigL.RigLScheduler, with a torchvision stand-in if the real one will not load."""
    try:
        importlib.import_module("torchvision")
        standin = False
    except Exception:
        folder = Path(tempfile.mkdtemp(prefix="torchvision-standin-"))
        for rel, text in _STANDIN.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
        sys.modules.pop("torchvision", None)
        sys.path.insert(0, str(folder))
        standin = True
    try:
        from rigl_torch.RigL import RigLScheduler
    except ImportError as err:
        raise SystemExit(f"rigl-torch is not installed ({err}); pip install --no-deps rigl-torch==0.5.2 "
                         "(or the 'peers' extra)") from None
    return RigLScheduler, standin


class Runner:
    """One variant: model, optimizer, LR schedule, its sparsifier, and its step timings."""

    def __init__(self, name, args, data, total_steps, steps_per_epoch, RigLScheduler=None):
        torch.manual_seed(args.seed)
        self.name = name
        self.model = build("mlp", data.num_classes, data.in_shape, widths=tuple(args.widths))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                   weight_decay=5e-4)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
        self.dst = self.pruner = None
        density = 1.0 - args.sparsity
        common = dict(total_steps=total_steps, distribution="uniform", update_interval=args.delta,
                      drop_fraction=args.alpha, drop_schedule="cosine", stop_fraction=0.75, seed=args.seed)
        if name == "regrow":
            self.dst = DynamicSparsity(self.model, self.opt, method="rigl", sparsity=args.sparsity, **common)
        elif name == "regrow_fc1_dense":
            self.dst = DynamicSparsity(self.model, self.opt, method="rigl", sparsity=args.sparsity,
                                       dense_layers=["net.fc1"], **common)
        elif name == "rigl_torch":
            # after the LR scheduler: it replaces optimizer.step with a plain function (the LR
            # scheduler then warns that step() was overridden; expected, silenced in main())
            self.pruner = RigLScheduler(self.model, self.opt, dense_allocation=density,
                                        sparsity_distribution="uniform", T_end=int(0.75 * total_steps),
                                        delta=args.delta, alpha=args.alpha, ignore_linear_layers=False)
        self.loss = nn.CrossEntropyLoss()
        self.times: list[float] = []
        self.accuracy: list[float] = []
        self.updates = 0

    def step(self, x, y) -> None:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.model(x), y).backward()
        if self.dst is not None:
            self.dst.step()
        elif self.pruner is not None:
            if self.pruner():
                self.opt.step()
            else:
                self.updates += 1
        else:
            self.opt.step()
        self.sched.step()
        self.times.append(time.perf_counter() - t0)

    def densities(self) -> tuple[float, float]:
        """(overall, first layer) fraction of non-zero Linear weights."""
        weights = [m.weight for m in self.model.modules() if isinstance(m, nn.Linear)]
        nnz = sum(int((w != 0).sum()) for w in weights)
        return nnz / sum(w.numel() for w in weights), int((weights[0] != 0).sum()) / weights[0].numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits, widths 64,32, batch 32, 10 epochs, dT 20")
    parser.add_argument("--data-dir", default="/work/shared/data/mnist", help="MNIST IDX files")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: 3; --quick: 10)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="target sparsity (default: 0.9)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128; --quick: 32")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--delta", type=int, default=None, help="update interval dT (default: 100; --quick: 20)")
    parser.add_argument("--alpha", type=float, default=0.3, help="initial drop fraction")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default: 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/peer_rigl[_quick].json)")
    args = parser.parse_args()
    args.epochs = args.epochs or (10 if args.quick else 3)
    args.delta = args.delta or (20 if args.quick else 100)
    args.widths = [64, 32] if args.quick else [300, 100]
    args.batch_size = args.batch_size or (32 if args.quick else 128)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")

    RigLScheduler, standin = import_rigl_torch()
    data = load("digits") if args.quick else load("mnist", args.data_dir)
    n = len(data.train)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = args.epochs * steps_per_epoch

    per_seed: dict[str, list[Runner]] = {v: [] for v in VARIANTS}
    for seed in range(args.seed, args.seed + args.seeds):
        args_seed = argparse.Namespace(**{**vars(args), "seed": seed})
        runners = [Runner(v, args_seed, data, total, steps_per_epoch, RigLScheduler) for v in VARIANTS]
        for epoch in range(args.epochs):
            order = epoch_order(n, seed, epoch)
            for b in range(steps_per_epoch):
                x, y = data.train.get_batch(order[b * args.batch_size:(b + 1) * args.batch_size])
                for r in runners:      # lockstep: every variant sees this batch now
                    r.step(x, y)
            for r in runners:
                r.accuracy.append(evaluate(r.model, data.test, 2000)[0])
        print(f"seed {seed}: " + "  ".join(f"{r.name} {100 * r.accuracy[-1]:.2f}%" for r in runners), flush=True)
        for r in runners:
            per_seed[r.name].append(r)

    dense_ms = 1e3 * statistics.median(t for r in per_seed["dense"] for t in r.times)
    rows = {}
    for name, runs in per_seed.items():
        times = [t for r in runs for t in r.times]
        accs = [r.accuracy[-1] for r in runs]
        dens = [r.densities() for r in runs]
        ms = 1e3 * statistics.median(times)
        q = statistics.quantiles(times, n=10)
        rows[name] = {
            "test_accuracy_mean": statistics.fmean(accs),
            "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "test_accuracy_per_seed": accs, "accuracy_per_epoch": [r.accuracy for r in runs],
            "density": statistics.fmean(d[0] for d in dens), "first_layer_density": statistics.fmean(d[1] for d in dens),
            "median_step_ms": ms, "p10_step_ms": 1e3 * q[0], "p90_step_ms": 1e3 * q[-1],
            "step_time_vs_dense": ms / dense_ms,
            "updates": [r.dst.stats()["updates"] if r.dst is not None else r.updates for r in runs][0],
        }

    print(f"\nLeNet-{'-'.join(map(str, args.widths))} on {'digits' if args.quick else 'MNIST'}, sparsity target "
          f"{args.sparsity}, uniform, {args.epochs} epochs, dT {args.delta}, batch {args.batch_size}, "
          f"{args.seeds} seeds, {args.threads} threads; test accuracy mean ± std over seeds\n")
    print(f"{'variant':<18} {'test acc (%)':>14} {'density':>8} {'fc1 dens':>9} {'ms/step':>8} {'vs dense':>9} {'updates':>8}")
    for name, row in rows.items():
        acc = f"{100 * row['test_accuracy_mean']:.2f} ± {100 * row['test_accuracy_std']:.2f}"
        print(f"{name:<18} {acc:>14} {row['density']:>8.4f} {row['first_layer_density']:>9.4f} "
              f"{row['median_step_ms']:>8.2f} {row['step_time_vs_dense']:>8.2f}x {row['updates']:>8}")

    out = args.out or RESULTS / f"peer_rigl{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import rigl_torch  # noqa: F401  (version from its metadata)
    from importlib.metadata import version
    out.write_text(json.dumps({
        "benchmark": "peer_rigl", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": __import__("os").cpu_count(), "threads": args.threads, "platform": platform.platform(),
                    "processor": platform.processor(), "torch": torch.__version__, "python": platform.python_version(),
                    "note": "shared machine; variants run in lockstep, compare ratios"},
        "rigl_torch_version": version("rigl-torch"), "torchvision_standin": standin,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dataset": "digits" if args.quick else "mnist", "steps": total, "results": rows,
    }, indent=2) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
