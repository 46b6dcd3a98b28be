"""The public surface: arguments, errors, layer discovery, optimizers, stats."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import regrow
from helpers import batches, build, mlp, train_step


def _dst(model=None, optimizer=None, **kw):
    model = model if model is not None else mlp()
    optimizer = optimizer if optimizer is not None else torch.optim.SGD(model.parameters(), lr=0.1)
    kw.setdefault("method", "rigl")
    kw.setdefault("sparsity", 0.9)
    kw.setdefault("total_steps", 10)
    return regrow.DynamicSparsity(model, optimizer, **kw)


def test_methods_tuple():
    assert regrow.METHODS == ("dense", "static", "set", "rigl", "gse", "dstee", "srigl", "gmp",
                              "snip", "grasp", "synflow", "snfs", "mest", "cht", "topkast")


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\)"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"sparsity": "high"}, "sparsity"),
    ({"total_steps": 0}, "total_steps must be an integer >= 1"),
    ({"method": "lottery"}, "choose one of dense, static, set, rigl, gse, dstee, srigl, gmp"),
    ({"distribution": "normal"}, "choose one of uniform, er, erk"),
    ({"drop_schedule": "step"}, "choose one of cosine, constant, linear"),
    ({"dense_layers": ["fc9"]}, "dense_layers names unknown layer"),
    ({"method": "gse", "sampling": "magic"}, "uniform, grabo, graest"),
    ({"method": "rigl", "gamma": 2.0}, "has no option"),
    ({"method": "srigl", "gamma_sal": 2.0}, "gamma_sal"),
    ({"method": "gmp", "total_steps": 5, "update_interval": 10}, "gmp has no update step"),
])
def test_bad_input_raises_one_line_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        _dst(**kwargs)
    assert "\n" not in str(info.value)


def test_model_with_nothing_to_sparsify():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="nothing to sparsify"):
        _dst(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_optimizer_must_hold_the_sparsified_parameters():
    model = mlp()
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer does not hold"):
        _dst(model=model, optimizer=other)


def test_unsupported_optimizer_needs_an_explicit_opt_in():
    model = mlp()
    with pytest.raises(ValueError, match="SGD, Adam, AdamW"):
        _dst(model=model, optimizer=torch.optim.RMSprop(model.parameters()))
    dst = _dst(model=model, optimizer=torch.optim.RMSprop(model.parameters(), lr=0.01),
               allow_any_optimizer=True, update_interval=2)
    opt = dst.optimizer
    for x, y in batches(6):
        train_step(model, opt, dst, x, y)
    for t in dst.targets:
        assert (opt.state[t.param]["square_avg"][~t.mask] == 0).all()


def test_optimizer_subclasses_are_accepted():
    class MySGD(torch.optim.SGD):
        pass
    model = mlp()
    _dst(model=model, optimizer=MySGD(model.parameters(), lr=0.1))


def test_default_discovery_linear_conv_and_attention():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.conv1 = nn.Conv1d(16, 16, 3)
            self.conv3 = nn.Conv3d(2, 4, 2)
            self.attn = nn.MultiheadAttention(16, 2)
            self.norm = nn.LayerNorm(16)
            self.head = nn.Linear(16, 3)
    net = Net()
    names = [s.name for s in regrow.core.layers.find_sparsifiable(net)]
    assert names == ["conv1.weight", "conv3.weight", "attn.in_proj_weight", "attn.out_proj.weight", "head.weight"]


def test_attention_with_separate_kdim_uses_qkv_projections():
    attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=5)
    names = [s.name for s in regrow.core.layers.find_sparsifiable(attn)]
    assert names == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]


def test_explicit_targets_and_dense_layers():
    model = mlp()
    found = regrow.core.layers.find_sparsifiable(model, targets=["0.weight", model[2], model[4].bias])
    assert [s.name for s in found] == ["0.weight", "2.weight", "4.bias"]
    found = regrow.core.layers.find_sparsifiable(model, dense_layers=["0", "4.weight"])
    assert [s.name for s in found] == ["2.weight"]
    dst = _dst(model=model, dense_layers=["0"])
    assert set(dst.masks) == {"2.weight", "4.weight"}


def test_masks_and_stats_contract():
    model, optimizer, dst = build("srigl", sparsity=0.8)
    assert set(dst.masks) == {"0.weight", "2.weight", "4.weight"}
    for name, p in model.named_parameters():
        if name in dst.masks:
            assert dst.masks[name].dtype == torch.bool and dst.masks[name].shape == p.shape
    stats = dst.stats()
    for key in ("density", "itop_rate", "updates", "step", "layers"):
        assert key in stats
    for name, layer in stats["layers"].items():
        assert set(layer) >= {"density", "nnz", "numel", "active_neurons"}
        assert layer["nnz"] == int(dst.masks[name].sum())
    assert stats["density"] == pytest.approx(sum(l["nnz"] for l in stats["layers"].values())
                                             / sum(l["numel"] for l in stats["layers"].values()))


def test_non_finite_gradient_skips_the_update_with_a_warning():
    model, optimizer, dst = build("rigl", total_steps=20, update_interval=2)
    x, y = batches(1)[0]
    train_step(model, optimizer, dst, x, y)
    masks = {n: m.clone() for n, m in dst.masks.items()}
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    row, col = (dst.masks["0.weight"]).nonzero()[0].tolist()   # an active slot
    model[0].weight.grad[row, col] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient at step 2"):
        dst.step()
    assert dst.stats()["updates"] == 0
    for name, t in zip(masks, dst.targets):
        assert torch.equal(masks[name], dst.masks[name])
        # the NaN weight slot, if masked, is still exactly zero; nnz is unchanged
        assert t.nnz == t.budget
        assert (t.param.detach()[~t.mask] == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in batches(4, seed=1):
            model.load_state_dict({k: torch.nan_to_num(v) for k, v in model.state_dict().items()})
            train_step(model, optimizer, dst, x, y)
    assert dst.stats()["updates"] >= 1


def test_load_state_dict_rejects_another_model():
    _, _, a = build("set")
    _, _, b = build("set", model=mlp((7,)))
    with pytest.raises(ValueError, match="do not match"):
        b.load_state_dict(a.state_dict())
    _, _, c = build("rigl")
    with pytest.raises(ValueError, match="method 'set'"):
        c.load_state_dict(a.state_dict())


def test_load_state_dict_rejects_another_seed():
    # the seed orders tied scores: resuming under another one would rewire differently
    _, _, a = build("set", seed=1)
    _, _, b = build("set", seed=2)
    with pytest.raises(ValueError, match="seed 1"):
        b.load_state_dict(a.state_dict())


def test_adam_state_of_pruned_and_grown_weights_is_zero():
    model, optimizer, dst = build("rigl", opt="adam", total_steps=20, update_interval=2)
    before = None
    for x, y in batches(6):
        before = {n: m.clone() for n, m in dst.masks.items()}
        train_step(model, optimizer, dst, x, y)
    for t in dst.targets:
        state = optimizer.state[t.param]
        grown = t.mask & ~before[t.name]
        assert grown.any()
        for key in ("exp_avg", "exp_avg_sq"):
            assert (state[key][~t.mask] == 0).all()
            assert (state[key][grown] == 0).all()
