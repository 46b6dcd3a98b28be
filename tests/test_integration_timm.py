"""timm's ResNets and ViTs under the masked backend, with no special cases: convolutions, the
fused qkv Linear, the attention projection and the MLP blocks are sparsified like any layer.
Models are built with random init (pretrained=False: nothing is downloaded).

timm imports torchvision, which needs a build matching the installed torch. Where none can be
installed (PyPI's torchvision fails to import beside the CPU-only torch wheel), timm is imported
over a stand-in (tests/stubs/torchvision: the names timm's model code imports at load time), which
is then taken out of sys.modules again; without timm this file skips.
"""
from __future__ import annotations

import pytest
import torch
from helpers import import_timm
from torch import nn

import regrow


timm = import_timm()

SPARSITY, STEPS = 0.8, 6


def resnet():
    from timm.models.resnet import BasicBlock, ResNet
    torch.manual_seed(0)
    return ResNet(block=BasicBlock, layers=[1, 1, 1, 1], num_classes=4)


def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=4)


def run(build, method, steps, *, state=None, stop=None):
    """Train ``steps`` steps (from ``state`` when given); stop after ``stop`` steps returning state."""
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    options = {"sampling": "grabo"} if method == "gse" else {}
    dst = regrow.DynamicSparsity(model, optimizer, method=method, sparsity=SPARSITY, total_steps=steps,
                                 update_interval=2, **options)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        dst.load_state_dict(state["dst"])
        start = dst.step_count
    itop_start, nonzero = dst.stats()["itop_rate"], 0
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(steps)]
    model.train()
    for x, y in batches[start:stop]:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        dst.step()
        params = dict(model.named_parameters())
        nonzero += sum(int((params[n].detach()[~m] != 0).sum()) for n, m in dst.masks.items())
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "dst": dst.state_dict()}
    return model, dst, itop_start, nonzero, saved


@pytest.mark.parametrize("build,expect", [
    (resnet, ["conv1.weight", "layer1.0.conv1.weight", "fc.weight"]),
    (vit, ["patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
           "blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc2.weight", "head.weight"]),
])
@pytest.mark.parametrize("method", ["rigl", "gse"])
def test_timm_model_trains_sparse_and_resumes(build, expect, method):
    model, dst, itop_start, nonzero, _ = run(build, method, STEPS)
    stats = dst.stats()
    assert set(expect) <= set(dst.masks)
    assert not any("norm" in n or n.startswith(("bn", "cls_token", "pos_embed")) for n in dst.masks)
    assert nonzero == 0
    assert abs(stats["nnz"] - (1 - SPARSITY) * stats["numel"]) <= len(stats["layers"])
    assert stats["updates"] == 2 and stats["itop_rate"] > itop_start

    _, _, _, _, half = run(build, method, STEPS, stop=3)
    resumed, dst2, *_ = run(build, method, STEPS, state=half)
    assert dst2.step_count == STEPS
    final, again = model.state_dict(), resumed.state_dict()
    assert all(torch.equal(final[k], again[k]) for k in final)
