"""Edge cases real training hits: non-finite values, dtypes, layouts, missing gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import regrow
from helpers import batches, build, cnn, mlp, train_step

DYNAMIC = ["set", "rigl", "gse", "dstee", "srigl", "gmp"]


def test_inf_gradient_in_an_inactive_slot_never_reaches_the_weights():
    model, optimizer, dst = build("rigl", total_steps=40, update_interval=10)
    t = dst.targets[0]
    row, col = (~t.mask).nonzero()[0].tolist()
    for x, y in batches(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        t.param.grad[row, col] = float("inf")
        dst.step()
        assert t.param[row, col].item() == 0.0
        assert optimizer.state[t.param]["momentum_buffer"][row, col].item() == 0.0
    assert torch.isfinite(model(batches(1)[0][0])).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("method", DYNAMIC)
def test_low_and_high_precision_parameters(method, dtype):
    model = mlp().to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    options = {"sampling": "graest"} if method == "gse" else {}
    dst = regrow.DynamicSparsity(model, optimizer, method=method, sparsity=0.8, total_steps=12,
                                 update_interval=2, **options)
    for x, y in batches(6):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x.to(dtype)).float(), y).backward()
        dst.step()
    assert dst.stats()["updates"] == 3
    for t in dst.targets:
        assert (t.param[~t.mask] == 0).all()


@pytest.mark.parametrize("method", ["set", "rigl", "srigl", "gse"])
def test_channels_last_convolutions(method):
    model = cnn(channels=8).to(memory_format=torch.channels_last)
    assert not model[2].weight.is_contiguous()
    model, optimizer, dst = build(method, model=model, total_steps=12, update_interval=2)
    for x, y in batches(6, in_shape=(1, 6, 6)):
        train_step(model, optimizer, dst, x, y)
    assert dst.stats()["updates"] == 3
    for t in dst.targets:
        assert (t.param[~t.mask] == 0).all()
        for buf in optimizer.state[t.param].values():
            assert (buf[~t.mask] == 0).all()
        if method != "srigl":
            assert t.nnz == t.budget


def test_gmp_reaches_its_target_even_if_its_last_update_sees_a_non_finite_gradient():
    model, optimizer, dst = build("gmp", sparsity=0.9, total_steps=20, update_interval=5)
    for step, (x, y) in enumerate(batches(20), start=1):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 10:
            model[0].weight.grad[0, 0] = float("inf")
        dst.step()
        model.load_state_dict({k: torch.nan_to_num(v) for k, v in model.state_dict().items()})
    for t in dst.targets:
        assert t.nnz == t.budget


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(12, 16)
        self.used = nn.Linear(16, 5)
        self.unused = nn.Linear(16, 5)   # e.g. an auxiliary head switched off

    def forward(self, x):
        return self.used(torch.relu(self.body(x)))


@pytest.mark.parametrize("method", ["rigl", "gse", "dstee", "srigl"])
def test_a_layer_without_gradient_is_left_alone(method):
    torch.manual_seed(0)
    model = TwoHeads()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = regrow.DynamicSparsity(model, optimizer, method=method, sparsity=0.8, total_steps=20, update_interval=2)
    unused = dst.masks["unused.weight"].clone()
    for x, y in batches(6):
        train_step(model, optimizer, dst, x, y)
    assert dst.stats()["updates"] == 3
    assert torch.equal(dst.masks["unused.weight"], unused)
    assert not torch.equal(dst.masks["used.weight"], dst.targets[1].ever_active)  # the used head rewired


def test_graest_under_autocast():
    model, optimizer, dst = build("gse", sampling="graest", total_steps=12, update_interval=2)
    for x, y in batches(4):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        dst.step()
    assert dst.stats()["updates"] == 2


def test_factorised_sampling_with_a_bias_target_on_a_linear():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = regrow.DynamicSparsity(model, optimizer, method="gse", sampling="grabo", sparsity=0.5,
                                 total_steps=12, update_interval=2, targets=["0.weight", "0.bias"])
    assert dst.targets[1].capture is None, "h and delta describe the weight, not the bias"
    for x, y in batches(4):
        train_step(model, optimizer, dst, x, y)
    assert dst.stats()["updates"] == 2


def test_checkpoint_of_another_sparsity_is_refused():
    _, _, a = build("set", sparsity=0.8)
    _, _, b = build("set", sparsity=0.9)
    with pytest.raises(ValueError, match="sparsity 0.8, not 0.9"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("method", ["rigl", "gse", "srigl"])
def test_grad_scaler_gives_the_same_training_as_full_precision(method):
    """A power-of-two loss scale is exact in fp32: with the scaler passed to step(), training is
    bitwise the same as without it, masks included."""
    data = batches(12, seed=7)
    model_a, opt_a, dst_a = build(method, model=mlp(seed=3), total_steps=12, update_interval=2)
    model_b, opt_b, dst_b = build(method, model=mlp(seed=3), total_steps=12, update_interval=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for x, y in data:
        train_step(model_a, opt_a, dst_a, x, y)
        opt_b.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model_b(x), y)).backward()
        dst_b.step(scaler)
        scaler.update()
    assert dst_a.stats()["updates"] == dst_b.stats()["updates"] > 0
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(a, b), name


def test_a_step_the_grad_scaler_skips_also_skips_the_topology_update():
    model, optimizer, dst = build("rigl", total_steps=20, update_interval=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = batches(1)[0]
    optimizer.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    dst.step(scaler)
    scaler.update()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {n: m.clone() for n, m in dst.masks.items()}
    optimizer.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite gradient at step 2"):
        dst.step(scaler)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 7, "the scaler saw the inf and backed off"
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters()), "the optimizer step was skipped"
    assert all(torch.equal(masks[n], dst.masks[n]) for n in masks) and dst.stats()["updates"] == 0
