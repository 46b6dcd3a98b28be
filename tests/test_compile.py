"""The engine with ``torch.compile``: compiled before or after the engine is built, for every
method, with the user's parameter names (no ``_orig_mod.`` prefix) and the same training as
eager. The compile tests use the ``aot_eager`` backend (Dynamo's tracing and AOTAutograd's
graphs, no code generation: seconds, not minutes, on 2 CPU cores); one run uses inductor."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import regrow

STEPS, INTERVAL = 5, 2
OPTIONS = {"gse": {"sampling": "grabo"}}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def train(method, order, backend="aot_eager"):
    """(masks, weights, stats, capture seen at each update step, nonzero masked weights)."""
    torch._dynamo.reset()   # no graph cached from another model (Dynamo would reuse it, hooks unseen)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run = torch.compile(model, backend=backend) if order == "before" else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # snip/synflow etc.: "never updates"
        dst = regrow.DynamicSparsity(run, optimizer, method=method, sparsity=0.5, total_steps=STEPS + 3,
                                     update_interval=INTERVAL, **OPTIONS.get(method, {}))
    if order == "after":
        run = torch.compile(model, backend=backend)
    elif order == "eager":
        run = model
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    captured, nonzero = [], 0
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(run(x), y).backward()
        if dst.method.needs_activations and dst.schedule.is_update(dst.step_count + 1):
            captured.append(all(t.activations() is not None for t in dst.targets))
        # GraSP's closure differentiates twice: torch.compile has no double backward, so the
        # closure runs the uncompiled model (the other methods never call it)
        dst.step(closure=lambda: nn.functional.cross_entropy(model(x), y))
        params = dict(model.named_parameters())
        nonzero += sum(int((params[n].detach()[~m] != 0).sum()) for n, m in dst.masks.items())
    masks = {n: m.clone() for n, m in dst.masks.items()}
    return masks, [p.detach().clone() for p in model.parameters()], dst.stats(), captured, nonzero


@pytest.mark.parametrize("method", regrow.METHODS)
def test_every_method_trains_compiled_before_or_after_the_engine(method):
    eager_masks, eager_weights, eager_stats, _, _ = train(method, "eager")
    for order in ("before", "after"):
        masks, weights, stats, captured, nonzero = train(method, order)
        assert sorted(masks) == ["0.weight", "2.weight"]        # the user's names
        assert nonzero == 0
        assert stats["density"] == eager_stats["density"] and stats["updates"] == eager_stats["updates"]
        assert all(captured)                                    # GSE's GraBo saw h and delta
        # same topology as eager; the weights agree to float rounding of the traced graphs
        assert all(torch.equal(masks[n], eager_masks[n]) for n in masks), (method, order)
        for a, b in zip(weights, eager_weights):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if regrow.methods.REGISTRY[method].dynamic and method not in ("dense", "static"):
        assert eager_stats["updates"] > 0


def test_gse_capture_under_compile_is_armed_at_update_steps_only():
    _, _, _, captured, _ = train("gse", "before")
    assert captured == [True, True]   # updates at steps 2 and 4 of 5


@pytest.mark.slow
def test_inductor_compiled_rigl_matches_eager():
    eager_masks, _, eager_stats, _, _ = train("rigl", "eager")
    masks, _, stats, _, nonzero = train("rigl", "after", backend="inductor")
    assert nonzero == 0 and stats["updates"] == eager_stats["updates"] > 0
    assert stats["itop_rate"] > 0.5
    assert sorted(masks) == sorted(eager_masks)
