"""SNIP, GraSP and SynFlow: masks decided once inside the first step(), checked against
independent computations of each paper's score, plus the invariants of a static mask."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import regrow
from helpers import batches, build, mlp, train_step

PRUNE_AT_INIT = ["snip", "grasp", "synflow"]


def _first_step(model, optimizer, dst, x, y):
    optimizer.zero_grad()
    loss_fn = nn.functional.cross_entropy
    loss_fn(model(x), y).backward()
    dst.step(closure=lambda: loss_fn(model(x), y))


def _global_top(scores: dict, total: int) -> dict:
    """Reference: keep the ``total`` largest scores over all layers (sort, ties to lower position)."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:total]] = True
    sizes = [scores[n].numel() for n in names]
    return {n: m.view_as(scores[n]) for n, m in zip(names, keep.split(sizes))}


def _weights(model, dst):
    params = dict(model.named_parameters())
    return {t.name: params[t.name] for t in dst.targets}


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_snip_keeps_the_top_of_grad_times_weight(scope):
    model, optimizer, dst = build("snip", scope=scope)
    assert all(bool(m.all()) for m in dst.masks.values()), "dense until the first step"
    x, y = batches(1, seed=4)[0]
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    score = {n: (p.grad * p).detach().abs() for n, p in _weights(model, dst).items()}
    dst.step()
    if scope == "global":
        expected = _global_top(score, sum(t.budget for t in dst.targets))
    else:
        expected = {t.name: _global_top({t.name: score[t.name]}, t.budget)[t.name] for t in dst.targets}
    for name, mask in dst.masks.items():
        assert torch.equal(mask, expected[name]), name
    if scope == "layer":
        assert all(t.nnz == t.budget for t in dst.targets)


def test_grasp_scores_match_a_finite_difference_hessian_gradient_product():
    model = mlp(seed=3).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    dst = regrow.DynamicSparsity(model, optimizer, method="grasp", sparsity=0.8, total_steps=10)
    x, y = batches(1, seed=5)[0]
    x = x.double()
    weights = _weights(model, dst)
    names, params = list(weights), list(weights.values())

    def grad_at(shift):
        with torch.no_grad():
            for p, s in zip(params, shift):
                p.add_(s)
        g = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, s in zip(params, shift):
                p.sub_(s)
        return g

    g = grad_at([torch.zeros_like(p) for p in params])
    eps = 1e-5
    plus, minus = grad_at([eps * gi for gi in g]), grad_at([-eps * gi for gi in g])
    hg = [(a - b) / (2 * eps) for a, b in zip(plus, minus)]
    # GraSP removes the largest S = -w * Hg: it keeps the largest w * Hg
    keep_score = {n: (p.detach() * h) for n, p, h in zip(names, params, hg)}

    computed = dst.method.scores(dst.targets, regrow.methods.base.FirstStep(
        model=model, input_shape=None, closure=lambda: nn.functional.cross_entropy(model(x), y),
        generator=torch.Generator()))
    for n in names:
        assert torch.allclose(computed[n].view_as(keep_score[n]), keep_score[n], rtol=1e-5, atol=1e-9), n
    _first_step(model, optimizer, dst, x, y)
    expected = _global_top(keep_score, sum(t.budget for t in dst.targets))
    for n in names:
        assert torch.equal(dst.masks[n], expected[n]), n


def test_grasp_without_a_closure_says_what_to_pass():
    model, optimizer, dst = build("grasp")
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="closure"):
        dst.step()


def _synflow_reference(model, targets):
    """R = 1^T |W3| (|W2| (|W1| 1 + |b1|) + |b2|) + |b3| by hand; score |W| * dR/d|W|."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    acts = [torch.ones(linears[0].in_features, dtype=torch.float64)]
    for lin in linears:
        acts.append(lin.weight.detach().double().abs() @ acts[-1] + lin.bias.detach().double().abs())
    upstream = torch.ones(linears[-1].out_features, dtype=torch.float64)
    scores = [None] * len(linears)
    for i in reversed(range(len(linears))):
        w = linears[i].weight.detach().double().abs()
        scores[i] = w * torch.outer(upstream, acts[i])   # dR/dW[o, j] = upstream[o] * input[j]
        upstream = w.T @ upstream
    return dict(zip([t.name for t in targets], scores))


def test_synflow_one_round_keeps_the_top_synaptic_flow():
    model, optimizer, dst = build("synflow", rounds=1)
    expected = _global_top(_synflow_reference(model, dst.targets), sum(t.budget for t in dst.targets))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batches(1)[0]
    model(x)   # the engine sees only the input shape
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    mode = model.training
    dst.step()   # zero gradients: the masks and SGD's weight decay alone change the weights
    assert model.training == mode
    decay = 1 - 0.05 * 1e-4   # helpers.make_optimizer("sgd")
    for name, mask in dst.masks.items():
        assert torch.equal(mask, expected[name]), name
        assert torch.allclose(dict(model.named_parameters())[name].detach(), before[name] * mask * decay)


def test_synflow_rounds_shrink_to_the_exact_total_and_differ_from_one_shot():
    def masks(rounds):
        model, optimizer, dst = build("synflow", model=mlp(seed=1), sparsity=0.95, rounds=rounds)
        train_step(model, optimizer, dst, *batches(1)[0])
        return dst
    iterative, one_shot = masks(100), masks(1)
    assert sum(t.nnz for t in iterative.targets) == sum(t.budget for t in iterative.targets)
    assert any(not torch.equal(iterative.masks[n], one_shot.masks[n]) for n in iterative.masks)


@pytest.mark.parametrize("method", PRUNE_AT_INIT)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_mask_is_decided_once_and_zeros_stay_zero(method, opt):
    model, optimizer, dst = build(method, opt=opt, total_steps=12, update_interval=2)
    data = batches(8, seed=6)
    _first_step(model, optimizer, dst, *data[0])
    decided = {n: m.clone() for n, m in dst.masks.items()}
    assert sum(t.nnz for t in dst.targets) == sum(t.budget for t in dst.targets)
    params = dict(model.named_parameters())
    for x, y in data[1:]:
        _first_step(model, optimizer, dst, x, y)
        for name, mask in dst.masks.items():
            assert torch.equal(mask, decided[name]), "the mask never changes after step 1"
            assert (params[name].detach()[~mask] == 0).all()
            for buf in optimizer.state[params[name]].values():
                if isinstance(buf, torch.Tensor) and buf.shape == mask.shape:
                    assert (buf[~mask] == 0).all(), "optimizer state of pruned weights stays zero"
    assert dst.stats()["updates"] == 0
    # the dense weights were scored, never trained: only the kept ones count as explored
    stats = dst.stats()
    assert stats["itop_rate"] == pytest.approx(stats["density"], abs=1e-12)


@pytest.mark.parametrize("method", PRUNE_AT_INIT)
def test_same_seed_same_masks_and_bitwise_resume(method, tmp_path):
    data = batches(10, seed=9)

    def run(model_seed, steps):
        model, optimizer, dst = build(method, model=mlp(seed=model_seed), opt="adam", total_steps=10)
        for x, y in steps:
            _first_step(model, optimizer, dst, x, y)
        return model, optimizer, dst

    model_a, _, dst_a = run(2, data)
    model_b, opt_b, dst_b = run(2, data[:4])
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "dst": dst_b.state_dict()},
               tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model_c, opt_c, dst_c = run(7, [])   # other weights: everything must come from the checkpoint
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    dst_c.load_state_dict(ckpt["dst"])
    for x, y in data[4:]:
        _first_step(model_c, opt_c, dst_c, x, y)
    for (name, pa), (_, pc) in zip(model_a.named_parameters(), model_c.named_parameters()):
        assert torch.equal(pa, pc), f"{name} differs after resume"
    assert all(torch.equal(dst_a.masks[n], dst_c.masks[n]) for n in dst_a.masks)
    model_d, _, dst_d = run(2, data)
    assert all(torch.equal(dst_a.masks[n], dst_d.masks[n]) for n in dst_a.masks)


@pytest.mark.parametrize("method", PRUNE_AT_INIT)
def test_bad_scope_is_refused(method):
    with pytest.raises(ValueError, match="scope"):
        build(method, scope="everywhere")
