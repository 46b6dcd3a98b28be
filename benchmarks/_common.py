"""What every benchmark script records about the machine and the process, and how the layer
benchmarks time their variants."""
from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def proc_status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (e.g. VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


@contextlib.contextmanager
def patched(obj, name: str, value, on: bool = True):
    """``obj.<name> = value`` inside the block when ``on`` (a variant with a route switched off),
    restored after."""
    real = getattr(obj, name)
    if on:
        setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, real)


def fwd_bwd(layer, x, g, route: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
    """A closure running one forward + backward of ``layer`` on ``x`` (a leaf that requires
    grad) with output gradient ``g``, gradients cleared first, inside ``route()``; it returns
    the detached output (``x.grad`` and the parameters' grads hold the gradients)."""
    def run():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        with route():
            y = layer(x)
            y.backward(g)
        return y.detach()
    return run


def interleaved_medians(variants: dict[str, Callable[[], object]], rounds: int, baseline: str = "dense"
                        ) -> tuple[dict[str, float], dict[str, float]]:
    """Times the variants in turn, round after round (after one warm-up call each), so a noisy
    shared machine slows them alike: (median ms per variant, median of the per-round ratios
    baseline / variant for the others)."""
    samples = {n: [] for n in variants}
    for fn in variants.values():
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    ms = {n: 1e3 * statistics.median(v) for n, v in samples.items()}
    ratios = {n: statistics.median(b / v for b, v in zip(samples[baseline], samples[n]))
              for n in variants if n != baseline}
    return ms, ratios


def training_step(config, x, y, n_classes: int, total_steps: int):
    """The model, optimizer (SGD, momentum 0.9) and sparsity of ``config`` built as ``regrow
    train`` builds them for inputs like ``x``, and a closure that runs one training step on
    (``x``, ``y``) and returns its seconds: ``(model, sparsity, step)``."""
    import torch
    from regrow.experiments.setup import build_model, make_sparsity

    model = build_model(config, tuple(x.shape[1:]), n_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dst = make_sparsity(config, model, opt, total_steps=total_steps)

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        dst.step()
        return time.perf_counter() - t
    return model, dst, step
