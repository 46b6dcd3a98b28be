"""Issue 16's dynamic methods (snfs, ...): each rule against an independent computation in the
test, and the invariants every method keeps (exact total, zeros stay zero in the weights and
the optimizer state, same seed same masks, bitwise resume)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import regrow
from helpers import batches, build, mlp, train_step
from regrow.methods.snfs import proportional_counts

DYNAMIC_NEW = [("snfs", {}), ("mest", {}), ("mest", {"mutation_schedule": "mest"}), ("cht", {}),
               ("cht", {"soft": True})]


# -- SNFS ----------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.integers(0, 50)), min_size=1, max_size=6), st.data())
def test_proportional_counts_sum_cap_and_proportion(layers, data):
    weights, caps = [w for w, _ in layers], [c for _, c in layers]
    total = data.draw(st.integers(0, sum(caps)))
    counts = proportional_counts(total, weights, caps)
    assert sum(counts) == total
    assert all(0 <= c <= cap for c, cap in zip(counts, caps))
    mass = sum(weights)
    if mass > 0 and all(total * w / mass < cap for w, cap in zip(weights, caps)):
        # no cap binds: every share is its exact proportion, rounded by less than one
        assert all(abs(c - total * w / mass) < 1 for c, w in zip(counts, weights))


def test_snfs_redistributes_by_mean_momentum_and_grows_by_momentum():
    beta = 0.9
    # uniform 90%: no layer can be asked to regrow more than it has inactive (caps: see above)
    model, optimizer, dst = build("snfs", model=mlp(seed=4), sparsity=0.9, distribution="uniform", total_steps=40,
                                  update_interval=4, momentum=beta, drop_fraction=0.5)
    params = dict(model.named_parameters())
    ema = {t.name: torch.zeros_like(params[t.name]) for t in dst.targets}
    data = batches(4, seed=8)
    for i, (x, y) in enumerate(data):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for n in ema:   # the reference running mean of the dense gradient
            ema[n] = beta * ema[n] + (1 - beta) * params[n].grad
        before = {n: m.clone() for n, m in dst.masks.items()}
        dst.step()
    assert dst.stats()["updates"] == 1
    for n in ema:
        assert torch.allclose(dst.method.buffers[n].view_as(ema[n]), ema[n], atol=1e-7)
    dropped = {n: int((before[n] & ~dst.masks[n]).sum()) for n in before}
    grown = {n: (dst.masks[n] & ~before[n]) for n in before}
    total = sum(dropped.values())
    assert total > 0 and total == sum(int(g.sum()) for g in grown.values())
    assert dropped == {n: int(dst.schedule.fraction(4) * int(before[n].sum())) for n in before}
    mean_m = {n: float(ema[n][before[n]].abs().mean()) for n in before}
    mass = sum(mean_m.values())
    for n in before:
        share = total * mean_m[n] / mass
        r = int(grown[n].sum())
        assert abs(r - share) < 1, (n, r, share)
        # the r inactive-before connections of largest |momentum|
        score = ema[n].abs().masked_fill(before[n], -1).view(-1)
        expected = torch.zeros_like(score, dtype=torch.bool)
        expected[torch.sort(score, descending=True, stable=True).indices[:r]] = True
        assert torch.equal(grown[n].view(-1), expected), n
    counts = [t.nnz for t in dst.targets]
    assert counts != [t.budget for t in dst.targets], "layer counts move with the momentum"


# -- invariants for every new dynamic method ----------------------------------------------------
@pytest.mark.parametrize("method,options", DYNAMIC_NEW)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_total_is_exact_and_zeros_stay_zero(method, options, opt):
    model, optimizer, dst = build(method, opt=opt, total_steps=24, update_interval=3, **options)
    params = dict(model.named_parameters())
    total = sum(t.budget for t in dst.targets)
    for x, y in batches(20, seed=1):
        train_step(model, optimizer, dst, x, y)
        assert sum(t.nnz for t in dst.targets) == total
        for t in dst.targets:
            mask = t.mask
            assert (params[t.name].detach()[~mask] == 0).all()
            for buf in optimizer.state[params[t.name]].values():
                if isinstance(buf, torch.Tensor) and buf.shape == mask.shape:
                    assert (buf[~mask] == 0).all()
    assert dst.stats()["updates"] > 0


@pytest.mark.parametrize("method,options", DYNAMIC_NEW + [("topkast", {})])
def test_same_seed_same_masks_and_bitwise_resume(method, options, tmp_path):
    data = batches(24, seed=11)

    def run(model_seed, seed, steps):
        model, optimizer, dst = build(method, model=mlp(seed=model_seed), opt="adam", total_steps=24,
                                      update_interval=3, seed=seed, **options)
        for x, y in steps:
            train_step(model, optimizer, dst, x, y)
        return model, optimizer, dst

    model_a, _, dst_a = run(2, 5, data)
    _, _, dst_same = run(2, 5, data)
    _, _, dst_other = run(2, 6, data)
    assert all(torch.equal(dst_a.masks[n], dst_same.masks[n]) for n in dst_a.masks)
    if method != "topkast":   # its sets come from the magnitudes of the same-seeded model alone
        assert any(not torch.equal(dst_a.masks[n], dst_other.masks[n]) for n in dst_a.masks)
    model_b, opt_b, dst_b = run(2, 5, data[:10])
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "dst": dst_b.state_dict()},
               tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model_c, opt_c, dst_c = run(9, 5, [])
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    dst_c.load_state_dict(ckpt["dst"])
    for x, y in data[10:]:
        train_step(model_c, opt_c, dst_c, x, y)
    for (name, pa), (_, pc) in zip(model_a.named_parameters(), model_c.named_parameters()):
        assert torch.equal(pa, pc), f"{name} differs after resume"
    assert all(torch.equal(dst_a.masks[n], dst_c.masks[n]) for n in dst_a.masks)
    assert dst_a.stats() == dst_c.stats()


# -- MEST ----------------------------------------------------------------------------------
def test_mest_drops_smallest_weight_plus_lambda_gradient_and_grows_inactive_at_zero():
    lam = 0.5
    model, optimizer, dst = build("mest", model=mlp(seed=6), total_steps=40, update_interval=4, lam=lam)
    params = dict(model.named_parameters())
    seen = []
    for t in dst.targets:
        def recording(drop, grow, values, _t=t, _orig=t.rewire):
            w = params[_t.name].detach().reshape(-1)
            active = _t.active_indices()
            importance = w[active].abs() + lam * grads[_t.name].reshape(-1)[active].abs()
            order = torch.sort(importance, stable=True).indices
            expected = active[order[:drop.numel()]].sort().values
            seen.append((_t.name, torch.equal(drop.sort().values, expected),
                         bool(_t.is_active(grow).any()), bool((values == 0).all()), drop.numel(), _t.nnz))
            _orig(drop, grow, values)
        t.rewire = recording
    for x, y in batches(4, seed=2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in params.items()}
        dst.step()
    assert len(seen) == len(dst.targets)
    for name, same, grew_active, zero, k, nnz in seen:
        assert same, f"{name}: dropped set is not the k smallest |w| + lam |g|"
        assert not grew_active and zero
        assert k == int(dst.schedule.fraction(4) * nnz) > 0


def test_mest_lambda_changes_what_is_dropped():
    def masks(lam):
        model, optimizer, dst = build("mest", model=mlp(seed=6), total_steps=40, update_interval=4, lam=lam)
        for x, y in batches(4, seed=2):
            train_step(model, optimizer, dst, x, y)
        return dst.masks
    a, b = masks(0.0), masks(100.0)
    assert any(not torch.equal(a[n], b[n]) for n in a)


def test_mest_step_schedule_follows_the_authors_bounds():
    model, optimizer, dst = build("mest", total_steps=32, update_interval=2, stop_fraction=1.0,
                                  drop_fraction=0.4, mutation_schedule="mest")
    counts = {}
    for t in dst.targets[:1]:
        def recording(drop, grow, values, _t=t, _orig=t.rewire):
            counts[step[0]] = (drop.numel(), _t.nnz)
            _orig(drop, grow, values)
        t.rewire = recording
    step = [0]
    for i, (x, y) in enumerate(batches(32, seed=3)):
        step[0] = i + 1
        train_step(model, optimizer, dst, x, y)
    for s, (k, nnz) in counts.items():
        level = 1.0 if s < 18 else 0.5   # 9/16 of 32 = 18; none at or after 3/4 = 24
        assert s < 24 and k == int(level * 0.4 * nnz), (s, k, nnz)
    assert max(counts) == 22 and 16 in counts and 18 in counts


def test_mest_runs_on_the_always_sparse_backend_with_the_same_drop_rule():
    """Only active weights' gradients are read: SparseLinear computes them from (h, delta)."""
    from regrow.nn import sparsify
    model = sparsify(mlp(seed=3), sparsity=0.8, seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    dst = regrow.DynamicSparsity(model, optimizer, method="mest", sparsity=0.8, total_steps=40,
                                 update_interval=4, lam=0.5)
    total = sum(t.nnz for t in dst.targets)
    checked = []
    for t in dst.targets:
        def recording(drop, grow, values, _t=t, _orig=t.rewire):
            active = _t.active_indices()
            importance = _t.active_values().abs() + 0.5 * _t.grad_at(active).abs()
            expected = active[torch.sort(importance, stable=True).indices[:drop.numel()]].sort().values
            checked.append(torch.equal(drop.sort().values, expected))
            _orig(drop, grow, values)
        t.rewire = recording
    for x, y in batches(8, seed=2):
        train_step(model, optimizer, dst, x, y)
    assert dst.stats()["updates"] == 2 and checked and all(checked)
    assert sum(t.nnz for t in dst.targets) == total


# -- CHT -----------------------------------------------------------------------------------
def _ch3_l3_brute_force(mask: torch.Tensor) -> dict[int, float]:
    """CH3-L3 by its definition: enumerate every length-3 path o - a - b - i of each missing
    link, form the local community (all inner nodes), count each inner node's links that leave
    it and the seeds, and sum 1 / sqrt((1 + de(a)) (1 + de(b)))."""
    rows, cols = mask.shape
    out = {}
    for o in range(rows):
        for i in range(cols):
            if mask[o, i]:
                continue
            paths = [(a, b) for a in range(cols) for b in range(rows)
                     if mask[o, a] and mask[b, a] and mask[b, i]]
            if not paths:
                continue
            community_in, community_out = {a for a, _ in paths}, {b for _, b in paths}
            score = 0.0
            for a, b in paths:
                de_a = sum(1 for x in range(rows) if mask[x, a] and x not in community_out and x != o)
                de_b = sum(1 for y in range(cols) if mask[b, y] and y not in community_in and y != i)
                score += 1 / math.sqrt((1 + de_a) * (1 + de_b))
            out[o * cols + i] = score
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 7), st.integers(1, 7), st.floats(0.1, 0.9), st.integers(0, 2**31 - 1))
def test_ch3_l3_matches_a_brute_force_count_of_length_3_paths(rows, cols, density, seed):
    from regrow.core.link_prediction import ch3_l3_scores
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < density
    keys, scores = ch3_l3_scores(mask.view(-1).nonzero().squeeze(1), rows, cols)
    expected = _ch3_l3_brute_force(mask)
    assert keys.tolist() == sorted(expected)
    assert all(abs(s - expected[k]) < 1e-12 for k, s in zip(keys.tolist(), scores.tolist()))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 7), st.integers(1, 7), st.floats(0.1, 0.9), st.integers(0, 2**31 - 1))
def test_ch3_l3_by_matmul_matches_the_brute_force_count(rows, cols, density, seed):
    import regrow.core.link_prediction as lp
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < density
    saved, lp.MATMUL_SPEEDUP = lp.MATMUL_SPEEDUP, float("inf")      # always the matmul route
    try:
        keys, scores = lp.ch3_l3_scores(mask.view(-1).nonzero().squeeze(1), rows, cols)
    finally:
        lp.MATMUL_SPEEDUP = saved
    expected = _ch3_l3_brute_force(mask)
    assert keys.tolist() == sorted(expected)
    assert all(abs(s - expected[k]) < 1e-12 for k, s in zip(keys.tolist(), scores.tolist()))


@pytest.mark.parametrize("density", [0.03, 0.2])
def test_ch3_l3_routes_agree_on_a_layer_sized_graph(monkeypatch, density):
    import regrow.core.link_prediction as lp
    mask = torch.rand(60, 150, generator=torch.Generator().manual_seed(3)) < density
    active = mask.view(-1).nonzero().squeeze(1)
    monkeypatch.setattr(lp, "MATMUL_SPEEDUP", 0)
    by_paths = lp.ch3_l3_scores(active, 60, 150)
    monkeypatch.setattr(lp, "MATMUL_SPEEDUP", float("inf"))
    monkeypatch.setattr(lp, "MATMUL_CHUNK", 500)             # several link chunks
    by_matmul = lp.ch3_l3_scores(active, 60, 150)
    assert torch.equal(by_paths[0], by_matmul[0])
    assert torch.allclose(by_paths[1], by_matmul[1], rtol=1e-12, atol=0)


def test_ch3_l3_in_small_chunks_equals_one_chunk(monkeypatch):
    import regrow.core.link_prediction as lp
    mask = torch.rand(40, 30, generator=torch.Generator().manual_seed(1)) < 0.15
    active = mask.view(-1).nonzero().squeeze(1)
    monkeypatch.setattr(lp, "MATMUL_SPEEDUP", 0)             # the path enumeration, in chunks
    whole = lp.ch3_l3_scores(active, 40, 30)
    monkeypatch.setattr(lp, "PATH_CHUNK", 50)
    monkeypatch.setattr(lp, "DENSE_TABLE", 10)     # the searchsorted co-degree tables too
    monkeypatch.setattr(lp, "BLOCK_ENTRIES", 64)
    pieces = lp.ch3_l3_scores(active, 40, 30)
    assert torch.equal(whole[0], pieces[0]) and torch.allclose(whole[1], pieces[1], rtol=1e-12)


def test_cht_grows_the_top_ch3_l3_links_without_gradients():
    model, optimizer, dst = build("cht", model=mlp((10, 8), seed=2), sparsity=0.6,
                                  total_steps=40, update_interval=4)
    seen = []
    for t in dst.targets:
        def recording(drop, grow, values, _t=t, _orig=t.rewire):
            before = _t.mask.view(_t.rows, _t.cols).clone()
            seen.append((before, drop.clone(), grow.clone(), values.clone()))
            _orig(drop, grow, values)
        t.rewire = recording
    for x, y in batches(4, seed=2):
        train_step(model, optimizer, dst, x, y)
    assert len(seen) == len(dst.targets)
    checked = 0
    for before, drop, grow, values in seen:
        scores = _ch3_l3_brute_force(before)
        k = grow.numel()
        assert k == drop.numel() > 0 and (values == 0).all()
        ranked = sorted(scores.values(), reverse=True)
        if len(ranked) >= k:   # every grown link is scored, none left out scores higher
            assert all(g in scores for g in grow.tolist())
            assert min(scores[g] for g in grow.tolist()) >= (ranked[k] if len(ranked) > k else -1)
            assert sorted((scores[g] for g in grow.tolist()), reverse=True) == pytest.approx(ranked[:k])
            checked += 1
    assert checked >= 2


def test_cht_soft_samples_only_scored_links_and_is_seeded():
    def run(seed):
        model, optimizer, dst = build("cht", model=mlp((10, 8), seed=2), sparsity=0.6,
                                      total_steps=40, update_interval=4, soft=True, temperature=2.0, seed=seed)
        grown = []
        for t in dst.targets:
            def recording(drop, grow, values, _t=t, _orig=t.rewire):
                scores = _ch3_l3_brute_force(_t.mask.view(_t.rows, _t.cols))
                grown.append((len(scores) >= grow.numel(), all(g in scores for g in grow.tolist())))
                _orig(drop, grow, values)
            t.rewire = recording
        for x, y in batches(8, seed=2):
            train_step(model, optimizer, dst, x, y)
        return dst.masks, grown
    a, grown = run(1)
    b, _ = run(1)
    c, _ = run(2)
    assert grown and all(ok for enough, ok in grown if enough)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_cht_runs_on_the_always_sparse_backend():
    from regrow.nn import sparsify
    model = sparsify(mlp(seed=3), sparsity=0.8, seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    dst = regrow.DynamicSparsity(model, optimizer, method="cht", sparsity=0.8, total_steps=40, update_interval=4)
    total = sum(t.nnz for t in dst.targets)
    for x, y in batches(8, seed=2):
        train_step(model, optimizer, dst, x, y)
    assert dst.stats()["updates"] == 2
    assert sum(t.nnz for t in dst.targets) == total


# -- Top-KAST ------------------------------------------------------------------------------
def test_topkast_starts_from_the_top_d_of_the_dense_init():
    model = mlp(seed=5)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = regrow.DynamicSparsity(model, optimizer, method="topkast", sparsity=0.8, total_steps=20,
                                 update_interval=4)
    for t in dst.targets:
        theta = init[t.name].reshape(-1)
        order = torch.sort(theta.abs(), descending=True, stable=True).indices
        assert set(t.mask.reshape(-1).nonzero().squeeze(1).tolist()) == set(order[:t.budget].tolist())
        assert set(dst.method.backward[t.name].nonzero().squeeze(1).tolist()) == set(order[:2 * t.budget].tolist())
        # values outside the forward set are kept, not lost
        assert torch.equal(dst.method.latent[t.name] + dict(model.named_parameters())[t.name].detach().reshape(-1),
                           theta)


def test_topkast_step_trains_the_backward_set_with_the_exploration_penalty():
    lam, lr = 0.05, 0.1
    model = mlp(seed=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    dst = regrow.DynamicSparsity(model, optimizer, method="topkast", sparsity=0.8, total_steps=20,
                                 update_interval=10, penalty=lam)
    params = dict(model.named_parameters())
    for x, y in batches(3, seed=7):
        theta = {t.name: params[t.name].detach().reshape(-1) + dst.method.latent[t.name] for t in dst.targets}
        forward = {t.name: t.mask.reshape(-1).clone() for t in dst.targets}
        backward = {t.name: dst.method.backward[t.name].clone() for t in dst.targets}
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = {t.name: params[t.name].grad.reshape(-1).clone() for t in dst.targets}
        dst.step()
        for t in dst.targets:
            n, density = t.name, t.budget / t.numel
            a, b = forward[n], backward[n]
            expected = theta[n].clone()
            expected[a] -= lr * (grads[n][a] + 2 * lam * theta[n][a])
            extra = b & ~a
            expected[extra] -= lr * (grads[n][extra] + 2 * lam / density * theta[n][extra])
            now = params[n].detach().reshape(-1) + dst.method.latent[n]
            assert torch.allclose(now, expected, atol=1e-6), n
            assert (params[n].detach().reshape(-1)[~a] == 0).all(), "the forward sees A only"


def test_topkast_update_reranks_forward_and_backward_sets():
    model, optimizer, dst = build("topkast", model=mlp(seed=4), total_steps=40, update_interval=4, penalty=0.0)
    params = dict(model.named_parameters())
    moved = 0
    for i, (x, y) in enumerate(batches(12, seed=3)):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        dst.step()
        if (i + 1) % 4 == 0:
            for t in dst.targets:
                theta = params[t.name].detach().reshape(-1) + dst.method.latent[t.name]
                forward = t.mask.reshape(-1)
                assert int(forward.sum()) == t.budget
                # every forward weight outweighs every other one; B holds the next M as well
                assert theta[forward].abs().min() >= theta[~forward].abs().max()
                b = dst.method.backward[t.name]
                assert int(b.sum()) == 2 * t.budget and bool((b | ~forward).all())
                assert theta[b].abs().min() >= theta[~b].abs().max()
            moved += sum(int(v["grown"]) for v in dst.last_update["layers"].values())
    assert moved > 0, "weights of the backward set entered the forward set"


def test_topkast_backward_set_has_the_optimizers_own_state():
    """Adam's moments of B \\ A are the optimizer's: non-zero there, while the parameter is zero."""
    model, optimizer, dst = build("topkast", opt="adam", total_steps=24, update_interval=10)
    params = dict(model.named_parameters())
    for x, y in batches(6, seed=1):
        train_step(model, optimizer, dst, x, y)
    for t in dst.targets:
        extra = dst.method.backward[t.name].view_as(t.mask) & ~t.mask
        assert (params[t.name].detach()[extra] == 0).all()
        assert (optimizer.state[params[t.name]]["exp_avg"][extra] != 0).float().mean() > 0.5


def test_topkast_refuses_the_always_sparse_backend():
    from regrow.nn import sparsify
    model = sparsify(mlp(seed=3), sparsity=0.8, seed=1)
    with pytest.raises(ValueError, match="topkast"):
        regrow.DynamicSparsity(model, torch.optim.SGD(model.parameters(), lr=0.1), method="topkast",
                               sparsity=0.8, total_steps=10)


def test_topkast_flops_count_the_backward_set_every_step(tmp_path):
    from regrow.experiments.config import TrainConfig
    from regrow.experiments.flops import growth_cost
    from regrow.experiments.train import train
    model, optimizer, dst = build("topkast")
    assert growth_cost(dst.method) == "subset_grad"
    assert dst.method.step_gradient_fraction(dst.targets[0]) == pytest.approx(dst.targets[0].budget / dst.targets[0].numel)
    base = dict(dataset="digits", epochs=1, sparsity=0.9, update_interval=5, threads=1)
    topkast = train(TrainConfig(method="topkast", **base), tmp_path / "t")
    static = train(TrainConfig(method="static", **base), tmp_path / "s")
    # forward and activation gradients at D, weight gradients over B = 2D: about 4/3 of static
    assert 1.2 < topkast["train_flops_ratio"] / static["train_flops_ratio"] < 1.4
