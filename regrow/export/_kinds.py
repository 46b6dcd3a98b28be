"""Which torch layers the export understands: per-feature ops, norms, pools, convolutions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.mish, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, torch.tanh, torch.sigmoid,
}  # not F.dropout: its ``training`` argument defaults to True even in eval mode
ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_"}
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# a constant map stays the same constant through these (max pools pad with -inf)
CONSTANT_PRESERVING_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d,
                              nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                              nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
