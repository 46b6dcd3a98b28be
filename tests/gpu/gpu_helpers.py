"""Small zoo models trained by DynamicSparsity on the device under test, at a chosen precision."""
from __future__ import annotations

import io
import os
import warnings
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import regrow
from regrow.models import build

#: the device under test: ``cuda`` unless REGROW_TEST_DEVICE says otherwise (``cpu`` checks
#: the suite's own logic on a machine without a GPU)
DEVICE_NAME = os.environ.get("REGROW_TEST_DEVICE", "cuda")


def skip_reason() -> str | None:
    """Why the suite cannot run here, or None."""
    if DEVICE_NAME == "cpu":
        return None
    if DEVICE_NAME.startswith("cuda"):
        if not torch.cuda.is_available():
            return ("no CUDA device (the GPU suite runs with `make test-gpu` on a GPU machine; "
                    "REGROW_TEST_DEVICE=cpu checks its logic on the CPU)")
        return None
    return f"REGROW_TEST_DEVICE={DEVICE_NAME!r}: only 'cuda' (or 'cuda:N') and 'cpu' are supported"


def skip_module_without_device() -> None:
    """Skip the calling test module as a whole (one SKIPPED line in ``make test``)."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)

CLASSES, IN_SHAPE = 4, (3, 8, 8)
MODEL_OPTIONS = {"mlp": {"widths": (32, 16)}, "resnet20": {"width": 0.25},
                 "vit": {"dim": 16, "depth": 1, "heads": 2}}
MODELS = tuple(MODEL_OPTIONS)
OPTIMIZERS = ("sgd", "adamw")
#: fp16 runs with a GradScaler; bf16 has fp32's exponent range and needs none
PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)
    raise ValueError(kind)


def batches(n: int, device: torch.device, batch: int = 8, seed: int = 0):
    """Drawn on the CPU and moved, so every device sees the same data."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *IN_SHAPE, generator=g).to(device),
             torch.randint(0, CLASSES, (batch,), generator=g).to(device)) for _ in range(n)]


class Run:
    """A zoo model, its optimizer, a DynamicSparsity engine and (fp16) a GradScaler."""

    def __init__(self, device: torch.device, method: str, model: str, opt: str, precision: str, *,
                 total_steps: int = 8, update_interval: int = 2, seed: int = 0, model_seed: int = 0,
                 sparsity: float = 0.9):
        self.device, self.precision, self.model_name = device, precision, model
        torch.manual_seed(model_seed)
        self.model = build(model, CLASSES, IN_SHAPE, **MODEL_OPTIONS[model]).to(device)
        self.optimizer = make_optimizer(opt, self.model.parameters())
        self.dst = regrow.DynamicSparsity(self.model, self.optimizer, method=method, sparsity=sparsity,
                                          total_steps=total_steps, update_interval=update_interval,
                                          stop_fraction=1.0, seed=seed)
        # a modest initial scale: the default 2**16 overflows the first steps of these tiny
        # models, which would skip most of the few topology updates a test sees
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10) if precision == "fp16" else None

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype = _AUTOCAST[self.precision]
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return nn.functional.cross_entropy(self.model(x), y)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        self._batch = (x, y)
        loss = self.loss(x, y)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        """What replaces ``optimizer.step()`` (and ``scaler.step``/``update``) with regrow."""
        extra = {}
        if getattr(self.dst.method, "decides_at_first_step", False) and self.dst.step_count == 0:
            x, y = self._batch   # GraSP re-runs the first batch with its graph
            extra["closure"] = lambda: self.loss(x, y)
        if self.scaler is None:
            self.dst.step(**extra)
        else:
            self.dst.step(self.scaler, **extra)
            self.scaler.update()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.forward_backward(x, y)
        self.optimizer_step()
        return loss

    def state(self) -> bytes:
        """Everything a resume needs, serialised as a checkpoint file would be."""
        buf = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "dst": self.dst.state_dict(),
                    "scaler": None if self.scaler is None else self.scaler.state_dict()}, buf)
        return buf.getvalue()

    def load(self, blob: bytes) -> None:
        state = torch.load(io.BytesIO(blob), map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.dst.load_state_dict(state["dst"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])


#: methods that move connections between layers (SNFS's momentum redistribution)
TOTAL_COUNT_METHODS = {"snfs"}


def per_weight_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list[torch.Tensor]:
    return [v for v in optimizer.state.get(param, {}).values()
            if isinstance(v, torch.Tensor) and v.shape == param.shape]


def check_invariants(run: Run) -> None:
    """The CPU suite's invariants: exact counts, inactive weights and their state exactly zero."""
    params = dict(run.model.named_parameters())
    method = run.dst.method.name
    at_first_step = getattr(run.dst.method, "decides_at_first_step", False)   # snip, grasp, synflow
    total_only = at_first_step or method in TOTAL_COUNT_METHODS
    if at_first_step and run.dst.step_count == 0:   # dense until the first step decides
        assert all(t.nnz == t.numel for t in run.dst.targets)
    elif total_only:   # layers trade connections; the network's total is the budget's
        assert sum(t.nnz for t in run.dst.targets) == sum(t.budget for t in run.dst.targets)
    for t in run.dst.targets:
        p, mask = params[t.name], t.mask
        assert mask.device == p.device, f"{t.name}: mask on {mask.device}, weight on {p.device}"
        assert bool((p.detach()[~mask] == 0).all()), f"{t.name}: an inactive weight is not zero"
        # Top-KAST trains weights outside its forward mask: their optimizer state is its own
        trains_outside = getattr(run.dst.method, "trains_outside_mask", False)
        for buf in () if trains_outside else per_weight_state(run.optimizer, p):
            assert bool((buf[~mask] == 0).all()), f"{t.name}: inactive optimizer state is not zero"
        counts = t.row_counts()
        if method == "dense":
            assert t.nnz == t.numel
        elif method == "srigl":
            assert bool(((counts == 0) | (counts == counts.max())).all()), f"{t.name}: fan-in not constant"
        elif method == "gmp":
            assert t.budget <= t.nnz <= t.numel
        elif not total_only:
            assert t.nnz == t.budget, f"{t.name}: {t.nnz} active, budget {t.budget}"


def snapshot(run: Run) -> dict[str, torch.Tensor]:
    """Weights, masks and optimizer state, copied to the CPU for bitwise comparison."""
    out = {f"param/{k}": v.detach().cpu().clone() for k, v in run.model.state_dict().items()}
    out.update({f"mask/{k}": v.cpu().clone() for k, v in run.dst.masks.items()})
    for i, (p, state) in enumerate(run.optimizer.state.items()):
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                out[f"opt/{i}/{k}"] = v.detach().cpu().clone()
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"differ bitwise: {differ[:5]}"


@contextmanager
def counting_syncs():
    """Counts host-device synchronisations (torch.cuda.set_sync_debug_mode) inside the block."""
    found: list[str] = []
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(before)
    # torch's own one-time notice ("Synchronization debug mode is a prototype feature and does
    # not yet detect all synchronizing operations") is not a synchronisation
    found.extend(str(w.message) for w in caught if "called a synchronizing" in str(w.message))
