"""Small models, optimizers and a training loop shared by the engine tests."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import regrow


def mlp(widths=(24, 16), n_in=12, n_out=5, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    layers, prev = [], n_in
    for w in widths:
        layers += [nn.Linear(prev, w), nn.ReLU()]
        prev = w
    return nn.Sequential(*layers, nn.Linear(prev, n_out))


def cnn(channels=6, n_out=5, seed=0) -> nn.Module:
    """Takes [B, 1, 6, 6] inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(channels * 36, n_out))


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)


def batches(n_steps: int, in_shape=(12,), n_out=5, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *in_shape, generator=g), torch.randint(0, n_out, (batch,), generator=g))
            for _ in range(n_steps)]


def train_step(model, optimizer, dst, x, y) -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    dst.step()


def train_steps(model, dst, steps) -> None:
    """``train_step`` over the (x, y) batches ``steps`` with the engine's own optimizer."""
    for x, y in steps:
        train_step(model, dst.optimizer, dst, x, y)


def build(method="rigl", model=None, opt="sgd", **kwargs):
    model = model if model is not None else mlp()
    optimizer = make_optimizer(opt, model.parameters())
    kwargs.setdefault("sparsity", 0.8)
    kwargs.setdefault("total_steps", 40)
    kwargs.setdefault("update_interval", 4)
    dst = regrow.DynamicSparsity(model, optimizer, method=method, **kwargs)
    return model, optimizer, dst


def import_timm():
    """timm, imported over the torchvision stand-in in tests/stubs when no real torchvision loads
    (PyPI's does not beside the CPU torch wheel); skips the calling module without timm."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed", allow_module_level=True)
    try:
        import torchvision  # noqa: F401
    except Exception:   # missing, or a build for another torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        stubs = str(Path(__file__).resolve().parent / "stubs")
        sys.path.insert(0, stubs)
        try:
            return importlib.import_module("timm")
        finally:
            sys.path.remove(stubs)
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]   # the stand-in serves timm's imports only
    return importlib.import_module("timm")


def update_once(layer: nn.Module, target, method, x: torch.Tensor, grad_out: torch.Tensor, ctx) -> None:
    """One topology update of one backend target as the engine runs it: capture armed, the
    batch's forward and backward (output gradient ``grad_out``), the gradient kept, the method's
    update, then the step's captures released and the gradient cleared."""
    target.arm_capture()
    layer(x).backward(grad_out)
    target.snapshot_grad()
    method.update(target, ctx)
    method.after_update([target], ctx)
    target.release()
    layer.zero_grad()


def masked_conv_reference(layer, x: torch.Tensor, grad_out: torch.Tensor):
    """``[y, grad_x, active-tap gradients, grad_bias or None]`` of the dense convolution that a
    SparseConv2d stands for (F.conv2d with its to_dense() kernel: a masked nn.Conv2d)."""
    x = x.detach().clone().requires_grad_()
    w = layer.to_dense().requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    y = torch.nn.functional.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation)
    grads = torch.autograd.grad(y, [x, w] + ([b] if b is not None else []), grad_out)
    gw = grads[1].reshape(layer.out_channels, -1)[layer.row_indices.long(), layer.col_indices.long()]
    return [y.detach(), grads[0], gw, grads[2] if b is not None else None]


class LargestTensor(TorchDispatchMode):
    """Records the largest strided tensor any op produces inside the ``with`` block: ``numel``
    (elements) and ``nbytes`` (bytes; deepcopy's storages are uint8)."""

    def __init__(self):
        super().__init__()
        self.numel = 0
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.numel = max(self.numel, t.numel())
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out


def srigl_trained_sparse_mlp():
    """An always-sparse 20-32-24-3 MLP (fan-in 6) after 9 SRigL steps at gamma_sal 0.9, with some
    neurons of its hidden layers (model[1], model[3]) ablated: ``(model, dst)``."""
    import warnings

    from regrow.nn import sparse_mlp
    torch.manual_seed(0)
    model = sparse_mlp(20, [32, 24], 3, fan_in=6, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "regrow. sparsity=0.9 has no effect")   # the layers fix their own N
        dst = regrow.DynamicSparsity(model, opt, method="srigl", sparsity=0.9, total_steps=40, update_interval=3,
                                     gamma_sal=0.9)
    x, y = torch.randn(16, 20), torch.randint(0, 3, (16,))
    for _ in range(9):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        dst.step()
    return model, dst
