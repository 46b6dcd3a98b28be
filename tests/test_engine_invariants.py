"""Property tests of the invariants every method must keep, over random small models/configs."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import batches, build, cnn, mlp, train_step

DYNAMIC_ZERO_INIT = ("rigl", "gse", "dstee", "srigl")


@st.composite
def configs(draw):
    method = draw(st.sampled_from(["static", "set", "rigl", "gse", "dstee", "srigl", "gmp"]))
    conv = draw(st.booleans())
    widths = tuple(draw(st.lists(st.integers(3, 20), min_size=1, max_size=3)))
    options = {}
    if method == "gse":
        options = {"gamma": draw(st.sampled_from([0.5, 1.0, 2.0])),
                   "sampling": draw(st.sampled_from(["uniform", "grabo", "graest"]))}
    if method == "srigl":
        options = {"gamma_sal": draw(st.sampled_from([0.0, 0.3, 0.9])), "ablation": draw(st.booleans())}
    return dict(
        method=method, conv=conv, widths=widths,
        sparsity=draw(st.sampled_from([0.5, 0.8, 0.9, 0.95])),
        distribution=draw(st.sampled_from(["uniform", "er", "erk"])),
        opt=draw(st.sampled_from(["sgd", "adam", "adamw"])),
        interval=draw(st.integers(1, 3)),
        schedule=draw(st.sampled_from(["cosine", "constant", "linear"])),
        seed=draw(st.integers(0, 2**16)),
        options=options,
    )


def _per_weight_state(optimizer, param):
    return [v for v in optimizer.state.get(param, {}).values()
            if isinstance(v, torch.Tensor) and v.shape == param.shape]


@given(cfg=configs())
def test_invariants_hold_after_init_and_every_step(cfg):
    model = cnn(seed=cfg["seed"]) if cfg["conv"] else mlp(cfg["widths"], seed=cfg["seed"])
    in_shape = (1, 6, 6) if cfg["conv"] else (12,)
    steps = 12
    model, optimizer, dst = build(
        cfg["method"], model=model, opt=cfg["opt"], sparsity=cfg["sparsity"], total_steps=steps,
        distribution=cfg["distribution"], update_interval=cfg["interval"], drop_schedule=cfg["schedule"],
        drop_fraction=0.5, seed=cfg["seed"], **cfg["options"])
    method = cfg["method"]
    targets = {t.name: t for t in dst.targets}
    params = dict(model.named_parameters())

    rewires = []   # every (layer, drop, grow) the method asked for, checked below
    for t in dst.targets:
        def recording(drop, grow, values, _t=t, _orig=t.rewire):
            before = _t.mask.clone().view(-1)
            assert before[drop].all(), "only active weights may be dropped"
            assert not before[grow].any(), "only inactive weights may be grown"
            assert not torch.isin(drop, grow).any(), "dropped and grown sets must be disjoint"
            assert drop.unique().numel() == drop.numel() and grow.unique().numel() == grow.numel()
            rewires.append((_t.name, drop.clone(), grow.clone(), values.clone()))
            _orig(drop, grow, values)
        t.rewire = recording

    total_target = round((1 - cfg["sparsity"]) * sum(t.numel for t in targets.values()))
    ever = {n: m.clone() for n, m in dst.masks.items()}
    last_itop = dst.stats()["itop_rate"]

    def check():
        stats = dst.stats()
        for name, t in targets.items():
            mask, p = t.mask, params[name]
            # masked weights and their optimizer state are exactly zero
            assert (p.detach()[~mask] == 0).all()
            for buf in _per_weight_state(optimizer, p):
                assert (buf[~mask] == 0).all()
            counts = t.row_counts()
            if method == "srigl":
                fan_in = int(counts.max())
                assert ((counts == 0) | (counts == fan_in)).all(), "srigl: constant fan-in"
                active = int((counts > 0).sum())
                # fan-in = floor(total / active): short of the initial total by less than one
                # weight per active neuron
                assert t.nnz == fan_in * active
                assert t.nnz <= method_obj.totals[name] < t.nnz + active
                assert stats["layers"][name]["active_neurons"] == int((counts > 0).sum())
            elif method == "gmp":
                if dst.step_count < method_obj.window[0] + 1 and stats["updates"] == 0:
                    assert t.nnz == t.numel
            else:
                assert t.nnz == t.budget, f"{name}: nnz {t.nnz} != budget {t.budget}"
        if method not in ("srigl", "gmp"):
            assert abs(stats["nnz"] - total_target) <= len(targets)
        return stats

    method_obj = dst.method
    check()
    for x, y in batches(steps, in_shape=in_shape, seed=cfg["seed"]):
        before = {n: m.clone() for n, m in dst.masks.items()}
        n_rewires = len(rewires)
        train_step(model, optimizer, dst, x, y)
        stats = check()
        for name, drop, grow, values in rewires[n_rewires:]:
            w = params[name].detach().view(-1)
            if method in DYNAMIC_ZERO_INIT:
                assert (w[grow] == 0).all(), "grown weights start at zero"
            elif method == "set":
                # sparse_init="fan_in" (default): bound 1/sqrt(the row's active fan-in before the update)
                fan_in = before[name].reshape(targets[name].rows, -1).sum(1)
                bound = 1 / fan_in[grow // targets[name].cols].clamp(min=1).float().sqrt()
                assert (w[grow].abs() <= bound).all() and torch.equal(w[grow], values)
            assert (w[drop] == 0).all()
        for n in ever:
            ever[n] |= dst.masks[n]
        # ITOP never decreases and is the fraction of sparsified weights ever active
        assert stats["itop_rate"] >= last_itop
        last_itop = stats["itop_rate"]
        expected = sum(int(m.sum()) for m in ever.values()) / sum(m.numel() for m in ever.values())
        assert stats["itop_rate"] == pytest.approx(expected, abs=1e-12)
        changed = any(not torch.equal(before[n], dst.masks[n]) for n in before)
        if method == "static":
            assert not changed
    if method == "gmp":
        for t in targets.values():
            assert t.nnz == t.budget, "gmp reaches each layer's final count at the last update"


@pytest.mark.parametrize("method", ["static", "set", "rigl", "gse", "dstee", "srigl", "gmp"])
def test_same_seed_same_masks_and_different_seed_different_masks(method):
    def run(seed):
        model, optimizer, dst = build(method, model=mlp(seed=1), seed=seed, total_steps=12, update_interval=2)
        for x, y in batches(12, seed=3):
            train_step(model, optimizer, dst, x, y)
        return dst.masks
    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(a[n], b[n]) for n in a)
    if method != "gmp":   # gmp's masks come from magnitudes of the same-seeded model
        assert any(not torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize("method", ["set", "rigl", "gse", "dstee", "srigl", "gmp"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_state_dict_round_trip_continues_bitwise(method, opt, tmp_path):
    data = batches(30, seed=11)
    options = {"sampling": "graest"} if method == "gse" else {}

    model_a, opt_a, dst_a = build(method, model=mlp(seed=2), opt=opt, total_steps=30, update_interval=3, **options)
    for x, y in data:
        train_step(model_a, opt_a, dst_a, x, y)

    model_b, opt_b, dst_b = build(method, model=mlp(seed=2), opt=opt, total_steps=30, update_interval=3, **options)
    for x, y in data[:13]:
        train_step(model_b, opt_b, dst_b, x, y)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "dst": dst_b.state_dict()}, path)

    ckpt = torch.load(path, weights_only=True)
    model_c, opt_c, dst_c = build(method, model=mlp(seed=99), opt=opt, total_steps=30, update_interval=3, **options)
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    dst_c.load_state_dict(ckpt["dst"])
    for x, y in data[13:]:
        train_step(model_c, opt_c, dst_c, x, y)

    assert dst_a.stats()["updates"] == dst_c.stats()["updates"] > 0
    for (na, pa), (nc, pc) in zip(model_a.named_parameters(), model_c.named_parameters()):
        assert torch.equal(pa, pc), f"{na} differs after resume"
    assert all(torch.equal(dst_a.masks[n], dst_c.masks[n]) for n in dst_a.masks)
    assert dst_a.stats()["itop_rate"] == dst_c.stats()["itop_rate"]


@given(cfg=configs(), split=st.integers(1, 11))
def test_same_seed_same_masks_and_resume_is_bitwise_for_any_config(cfg, split, tmp_path_factory):
    """Two runs from one seed agree; a run saved at any step and resumed in a fresh process
    state continues bitwise (weights, masks, ITOP) for every method and configuration."""
    in_shape = (1, 6, 6) if cfg["conv"] else (12,)
    steps = 12
    data = batches(steps, in_shape=in_shape, seed=cfg["seed"])

    def fresh(model_seed):
        model = cnn(seed=model_seed) if cfg["conv"] else mlp(cfg["widths"], seed=model_seed)
        return build(cfg["method"], model=model, opt=cfg["opt"], sparsity=cfg["sparsity"], total_steps=steps,
                     distribution=cfg["distribution"], update_interval=cfg["interval"],
                     drop_schedule=cfg["schedule"], drop_fraction=0.5, seed=cfg["seed"], **cfg["options"])

    model_a, opt_a, dst_a = fresh(cfg["seed"])
    model_b, opt_b, dst_b = fresh(cfg["seed"])
    assert all(torch.equal(dst_a.masks[n], dst_b.masks[n]) for n in dst_a.masks)
    for x, y in data[:split]:
        train_step(model_a, opt_a, dst_a, x, y)
        train_step(model_b, opt_b, dst_b, x, y)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "dst": dst_b.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    model_c, opt_c, dst_c = fresh(cfg["seed"] + 1)   # different initial weights: all must come from the checkpoint
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    dst_c.load_state_dict(ckpt["dst"])
    for x, y in data[split:]:
        train_step(model_a, opt_a, dst_a, x, y)
        train_step(model_c, opt_c, dst_c, x, y)
    for (name, pa), (_, pc) in zip(model_a.named_parameters(), model_c.named_parameters()):
        assert torch.equal(pa, pc), f"{name} differs after resume"
    assert all(torch.equal(dst_a.masks[n], dst_c.masks[n]) for n in dst_a.masks)
    assert dst_a.stats() == dst_c.stats()
