"""Each method's own rule, checked against an independent computation."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import regrow
from helpers import batches, build, cnn, mlp, train_step
from regrow.core.sampling import sample_subset, uniform_inactive
from regrow.core.selection import tie_keys


def _backward_of_first_update_step(model, optimizer, dst):
    """Train to just before step 4 (the first update) and run its forward and backward."""
    data = batches(4, seed=2)
    for x, y in data[:3]:
        train_step(model, optimizer, dst, x, y)
    x, y = data[3]
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def _grads_and_masks_at_update(method, **kwargs):
    """Run to the first update step; return grads, weights and masks just before it, and masks after."""
    model, optimizer, dst = build(method, total_steps=40, update_interval=4, **kwargs)
    _backward_of_first_update_step(model, optimizer, dst)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: m.clone() for n, m in dst.masks.items()}
    dst.step()
    after = {n: m.clone() for n, m in dst.masks.items()}
    return model, dst, grads, before, after


def test_rigl_grows_the_largest_gradients_among_inactive():
    model, dst, grads, before, after = _grads_and_masks_at_update("rigl")
    assert dst.stats()["updates"] == 1
    for name in before:
        grown = (after[name] & ~before[name]).view(-1)
        k = int(grown.sum())
        assert k > 0
        score = grads[name].abs().view(-1).masked_fill(before[name].view(-1), -1)
        expected = torch.zeros_like(grown)
        # equal scores (zero gradients) go by the seeded tie hash of the update at step 4
        by_key = tie_keys(torch.arange(score.numel()), 0, 4, name.rsplit('.', 1)[0]).argsort(descending=True)
        expected[by_key[torch.sort(score[by_key], descending=True, stable=True).indices[:k]]] = True
        assert torch.equal(grown, expected), name


def test_drop_removes_the_smallest_magnitudes():
    model, optimizer, dst = build("set", total_steps=40, update_interval=4, drop_fraction=0.3)
    seen = []
    for t in dst.targets:
        def recording(drop, grow, values, _t=t, _orig=t.rewire):
            w = _t.param.detach().view(-1)
            kept = _t.active_indices()[~torch.isin(_t.active_indices(), drop)]
            seen.append((_t.nnz, drop.numel(), w[drop].abs().max(), w[kept].abs().min()))
            _orig(drop, grow, values)
        t.rewire = recording
    for x, y in batches(4, seed=2):
        train_step(model, optimizer, dst, x, y)
    assert len(seen) == len(dst.targets)
    for nnz, k, largest_dropped, smallest_kept in seen:
        assert k == int(dst.schedule.fraction(4) * nnz) > 0
        assert largest_dropped <= smallest_kept


def test_gse_grows_only_from_its_subset_and_by_gradient():
    torch.manual_seed(0)
    model, optimizer, dst = build("gse", total_steps=40, update_interval=4, gamma=0.5, seed=3)
    target = dst.targets[0]
    _backward_of_first_update_step(model, optimizer, dst)
    grad = dict(model.named_parameters())[target.name].grad.clone()
    before = target.mask.clone()
    # replay the generator exactly as the update will use it: first layer samples first
    gen = torch.Generator()
    gen.set_state(dst.generator.get_state())
    k = int(dst.schedule.fraction(4) * target.nnz)
    subset = uniform_inactive(target, max(k, math.ceil(0.5 * target.nnz)), gen)
    dst.step()
    grown = (target.mask & ~before).view(-1).nonzero().squeeze(1)
    assert grown.numel() == k
    assert torch.isin(grown, subset).all(), "GSE grows only within its sampled subset"
    scores = grad.view(-1)[subset].abs()
    top = subset[torch.sort(scores, descending=True, stable=True).indices[:k]]
    assert torch.equal(grown.sort().values, top.sort().values)


@pytest.mark.parametrize("kind", ["uniform", "grabo", "graest"])
def test_samplers_return_distinct_inactive_connections(kind):
    model, optimizer, dst = build("gse", sampling=kind, total_steps=40, update_interval=1)
    x, y = batches(1, seed=1)[0]
    for t in dst.targets:
        t.arm_capture()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for t in dst.targets:
        t.snapshot_grad()
        m = t.nnz // 2
        flat = sample_subset(kind, t, m, torch.Generator().manual_seed(0))
        assert flat.numel() == min(m, t.numel - t.nnz)
        assert flat.unique().numel() == flat.numel()
        assert not t.is_active(flat).any()
        assert ((flat >= 0) & (flat < t.numel)).all()
        if kind != "uniform":
            assert t.activations() is not None, "linear layers capture h and delta for factorised sampling"


def test_grabo_never_samples_rows_with_zero_output_gradient():
    # a neuron whose output gradient is exactly zero has zero GraBo probability
    model = nn.Sequential(nn.Linear(12, 30), nn.ReLU(), nn.Linear(30, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = regrow.DynamicSparsity(model, optimizer, method="gse", sampling="grabo", sparsity=0.9,
                                 total_steps=10, update_interval=1, distribution="uniform")
    t = dst.targets[1]
    t.arm_capture()
    x, y = batches(1, seed=1)[0]
    optimizer.zero_grad()
    logits = model(x)
    (logits[:, :3].sum()).backward()   # output rows 3 and 4 get no gradient
    t.snapshot_grad()
    flat = sample_subset("grabo", t, 20, torch.Generator().manual_seed(0))
    rows = flat // t.cols
    assert flat.numel() == 20 and not ((rows == 3) | (rows == 4)).any()


def test_uniform_sampling_is_uniform_by_chi_square():
    model, optimizer, dst = build("gse", total_steps=40, sparsity=0.95, distribution="uniform")
    t = dst.targets[0]
    gen = torch.Generator().manual_seed(0)
    draws = 3000
    hits = torch.zeros(t.numel)
    for _ in range(draws):
        hits[uniform_inactive(t, 10, gen)] += 1
    inactive = ~t.mask.view(-1)
    assert hits[~inactive].sum() == 0
    observed = hits[inactive]
    cells = observed.numel()
    expected = draws * 10 / cells
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # chi-square with cells-1 degrees of freedom: mean cells-1, sd sqrt(2(cells-1)); a sampler
    # that favoured half of the inactive set would land near draws * 10 here
    assert chi2 < (cells - 1) + 6 * math.sqrt(2 * (cells - 1)), chi2
    assert (observed > 0).all()


@pytest.mark.parametrize("c", [0.0, 1e-2, 1e6])
def test_dstee_grows_the_top_of_its_score_at_a_later_update(c):
    """At the third update some inactive weights were active before (count >= 1): the grown set
    is exactly the top-k of |grad| + c ln(t) / (N + eps) over the weights inactive before it."""
    model, optimizer, dst = build("dstee", total_steps=60, update_interval=4, c=c, eps=1.0, drop_fraction=0.5)
    data = batches(12, seed=2)
    for x, y in data[:11]:
        train_step(model, optimizer, dst, x, y)
    counts = {n: dense_visits(dst, n) for n in dst.method.visits}
    x, y = data[11]
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: m.clone() for n, m in dst.masks.items()}
    dst.step()
    assert dst.stats()["updates"] == 3
    revisited = 0
    for name in before:
        inactive = (~before[name]).view(-1)
        grown = (dst.masks[name] & ~before[name]).view(-1)
        score = grads[name].abs().view(-1) + c * math.log(12) / (counts[name].float() + 1.0)
        score[~inactive] = -1
        k = int(grown.sum())
        expected = torch.zeros_like(grown)
        # equal scores (c = 1e6 swamps float32 gradients) go by the seeded tie hash
        by_key = tie_keys(torch.arange(score.numel()), 0, 12, name.rsplit('.', 1)[0]).argsort(descending=True)
        expected[by_key[torch.sort(score[by_key], descending=True, stable=True).indices[:k]]] = True
        assert torch.equal(grown, expected), name
        assert (counts[name][inactive] >= 1).any(), "some candidates were active before"
        revisited += int((counts[name][grown] >= 1).sum())
    if c == 1e6:
        assert revisited == 0, "a huge exploration bonus grows only never-active weights"


def test_dstee_counts_track_active_updates():
    model, optimizer, dst = build("dstee", total_steps=40, update_interval=2)
    t = dst.targets[0]
    expected = t.mask.view(-1).int().clone()
    for x, y in batches(8, seed=4):
        train_step(model, optimizer, dst, x, y)
        if dst.step_count % 2 == 0:
            expected += t.mask.view(-1).int()
    assert torch.equal(dense_visits(dst, t.name), expected)
    keys, _ = dst.method.visits[t.name]
    assert torch.equal(keys, t.ever_active.view(-1).nonzero().squeeze(1)), "counts are kept for ever-active keys only"


def dense_visits(dst, name):
    """DST-EE's visit counts as one dense vector (they are stored for ever-active keys only)."""
    t = next(t for t in dst.targets if t.name == name)
    keys, counts = dst.method.visits[name]
    dense = torch.zeros(t.numel, dtype=torch.int32)
    dense[keys] = counts
    return dense


def test_srigl_ablates_neurons_and_keeps_constant_fan_in():
    model = mlp((40, 40), seed=0)
    model, optimizer, dst = build("srigl", model=model, sparsity=0.9, gamma_sal=0.95,
                                  total_steps=40, update_interval=2, drop_fraction=0.5)
    for x, y in batches(12, seed=5):
        train_step(model, optimizer, dst, x, y)
    stats = dst.stats()
    ablated = sum(l["neurons"] - l["active_neurons"] for l in stats["layers"].values())
    assert ablated > 0, "a high saliency threshold must ablate some neurons"
    for t in dst.targets:
        counts = t.row_counts()
        fan_in = int(counts.max())
        assert ((counts == 0) | (counts == fan_in)).all()
        assert t.nnz == fan_in * int((counts > 0).sum())


def test_srigl_without_ablation_keeps_every_neuron():
    model, optimizer, dst = build("srigl", model=mlp((40, 40)), sparsity=0.9, gamma_sal=0.95,
                                  ablation=False, total_steps=40, update_interval=2)
    for x, y in batches(12, seed=5):
        train_step(model, optimizer, dst, x, y)
    for t in dst.targets:
        assert (t.row_counts() == t.row_counts()[0]).all() and t.row_counts()[0] > 0


def test_srigl_on_conv_counts_fan_in_per_output_channel():
    model, optimizer, dst = build("srigl", model=cnn(channels=8), sparsity=0.8, total_steps=20, update_interval=2)
    for x, y in batches(6, in_shape=(1, 6, 6), seed=1):
        train_step(model, optimizer, dst, x, y)
    conv = dst.targets[1]
    assert conv.rows == 8 and conv.cols == 8 * 9
    counts = conv.row_counts()
    assert ((counts == 0) | (counts == counts.max())).all()


def test_gmp_follows_the_cubic_schedule():
    model, optimizer, dst = build("gmp", sparsity=0.9, total_steps=100, update_interval=10, stop_fraction=0.75)
    t = dst.targets[0]
    assert t.nnz == t.numel
    first, last = dst.method.window
    seen = {}
    for i, (x, y) in enumerate(batches(100, seed=6), start=1):
        train_step(model, optimizer, dst, x, y)
        seen[i] = t.nnz
    for s in dst.schedule.update_steps():
        p = (s - first) / (last - first)
        assert seen[s] == t.numel - round((t.numel - t.budget) * (1 - (1 - p) ** 3))
    assert seen[100] == t.budget and dst.stats()["itop_rate"] == 1.0


def test_dense_method_trains_every_weight():
    model, optimizer, dst = build("dense", sparsity=0.9)
    assert dst.stats()["density"] == 1.0
    for x, y in batches(5):
        train_step(model, optimizer, dst, x, y)
    assert dst.stats()["density"] == 1.0 and dst.stats()["updates"] == 0


def test_set_grown_weights_follow_the_layer_init_or_zero():
    for grow_init in ("random", "zero"):
        model, dst, grads, before, after = _grads_and_masks_at_update("set", grow_init=grow_init)
        params = dict(model.named_parameters())
        for name in before:
            grown = after[name] & ~before[name]
            values = params[name].detach()[grown]
            if grow_init == "zero":
                assert (values == 0).all()
            else:
                # sparse_init="fan_in" (the default): each neuron's bound is 1/sqrt(its active fan-in)
                fan_in = before[name].reshape(before[name].shape[0], -1).sum(1)
                rows = grown.reshape(grown.shape[0], -1).nonzero()[:, 0]
                bound = 1 / fan_in[rows].float().sqrt()
                assert (values != 0).all() and (values.abs() <= bound).all()
                assert (values.abs() > 1 / math.sqrt(params[name][0].numel())).any()


def test_factorised_sampling_tops_up_when_the_marginals_are_too_narrow():
    from regrow.core.sampling import _factorised
    model, optimizer, dst = build("gse", sparsity=0.5, distribution="uniform")
    t = dst.targets[0]
    rows = torch.zeros(t.rows)
    rows[0] = 1.0   # all mass on one row and one column: at most one pair can be drawn
    cols = torch.zeros(t.cols)
    cols[0] = 1.0
    m = (t.numel - t.nnz) // 2
    flat = _factorised(t, m, torch.Generator().manual_seed(0), rows, cols)
    assert flat.numel() == m and flat.unique().numel() == m and not t.is_active(flat).any()
