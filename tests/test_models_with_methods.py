"""Every model of the zoo trains with every method: counts, masks and fan-in stay valid."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import regrow
from regrow.models import MODELS, build

SMALL = {"mlp": {"widths": (32, 16)}, "resnet20": {"width": 0.25}, "resnet32": {"width": 0.25},
         "resnet56": {"width": 0.25}, "resnet18": {"width": 0.0625}, "vgg11": {"width": 0.0625},
         "vgg16": {"width": 0.0625}, "vgg19": {"width": 0.0625}, "vit": {"dim": 16, "depth": 1, "heads": 2}}


@pytest.mark.parametrize("method", regrow.METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_model_trains_with_method(name, method):
    torch.manual_seed(0)
    model = build(name, 4, (3, 8, 8), **SMALL.get(name, {}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dst = regrow.DynamicSparsity(model, optimizer, method=method, sparsity=0.9, total_steps=4,
                                 update_interval=1, stop_fraction=1.0)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        dst.step(closure=lambda: nn.functional.cross_entropy(model(x), y))   # read by grasp only
    assert dst.stats()["updates"] == (3 if dst.method.dynamic else 0)
    params = dict(model.named_parameters())
    # pruning at init ranks all layers together; snfs redistributes growth across layers
    moves_layer_counts = dst.method.decides_at_first_step or method == "snfs"
    for t in dst.targets:
        assert (params[t.name].detach()[~t.mask] == 0).all()
        counts = t.row_counts()
        if method == "srigl":
            assert ((counts == 0) | (counts == counts.max())).all()
        elif method != "dense" and not moves_layer_counts:
            assert t.nnz == t.budget
    if moves_layer_counts:   # the total is exact, the layers' shares are the method's choice
        assert sum(t.nnz for t in dst.targets) == sum(t.budget for t in dst.targets)
    if name == "vit":
        assert any(n.endswith("in_proj_weight") for n in dst.masks), "attention projections are sparsified"
