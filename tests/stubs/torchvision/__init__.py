"""A stand-in for torchvision so that timm's model code imports (tests only)."""
import sys
import types

import torch
from torch import nn


class _Anything(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {cls.__name__} is not available in tests")


class FrozenBatchNorm2d(nn.Module):
    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, init in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                           ("running_var", torch.ones)):
            self.register_buffer(name, init(num_features))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{self.__name__}.{name}"
        if full in sys.modules:
            return sys.modules[full]
        return _Anything(name, (), {})


def _module(name):
    mod = _StubModule(name)
    mod.__path__ = []
    sys.modules[name] = mod
    return mod


for _name in ("torchvision.transforms", "torchvision.transforms.functional", "torchvision.transforms.v2",
              "torchvision.datasets", "torchvision.ops", "torchvision.ops.misc", "torchvision.models",
              "torchvision.models.feature_extraction", "torchvision.utils", "torchvision.io"):
    _module(_name)
sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
__version__ = "0.0.0+stand-in"
def __getattr__(name):
    full = f"torchvision.{name}"
    if full in sys.modules:
        return sys.modules[full]
    return _Anything(name, (), {})
