"""RigL-family growth without a dense gradient: the row-block scan (regrow.core.row_blocks)
against whole-layer references, the same decisions on SparseLinear as on the masked backend,
and a 32k x 32k RigL update in a fraction of a dense gradient's memory."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import regrow
from helpers import update_once
from regrow.backends.masked import MaskedTarget
from regrow.backends.sparse import SparseLinearTarget
from regrow.core import row_blocks
from regrow.core.optim_state import OptimizerStateMasker
from regrow.core.row_blocks import rows_per_block, top_candidates, top_candidates_per_row
from regrow.core.selection import tie_keys
from regrow.methods import UpdateContext, make_method
from regrow.nn.sparse_linear import SparseLinear


class GridTarget:
    """Just what the scan reads: a gradient and a sorted active key set."""

    name = "w"

    def __init__(self, grad: torch.Tensor, mask: torch.Tensor):
        self.grad, self.mask = grad, mask
        self.rows, self.cols = grad.shape
        self.device = grad.device

    def active_indices(self):
        return self.mask.view(-1).nonzero().squeeze(1)

    def grad_rows(self, start, stop):
        return self.grad[start:stop]


def grid(seed: int, rows: int, cols: int, levels: int | None):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(rows, cols, generator=gen)
    if levels is not None:   # few distinct values: many ties
        grad = torch.randint(levels, (rows, cols), generator=gen).float()
    mask = torch.rand(rows, cols, generator=gen) < 0.4
    return GridTarget(grad, mask)


def hashed(seed):
    return lambda flat: tie_keys(flat, seed, 3, "w")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), rows=st.integers(1, 12), cols=st.integers(1, 12),
       levels=st.sampled_from([None, 2, 5]), block_rows=st.integers(1, 13), use_hash=st.booleans(),
       k_frac=st.floats(0.0, 1.0))
def test_top_candidates_equals_the_whole_layer_selection(seed, rows, cols, levels, block_rows, use_hash, k_frac):
    t = grid(seed, rows, cols, levels)
    inactive = (~t.mask).view(-1).nonzero().squeeze(1)
    k = int(k_frac * inactive.numel())
    ties = hashed(seed) if use_hash else None
    score = t.grad.view(-1).abs()[inactive]
    # independent reference: sort every inactive connection by (score, tie key or -index)
    second = ties(inactive) if use_hash else -inactive
    order = sorted(range(inactive.numel()), key=lambda i: (float(score[i]), int(second[i])), reverse=True)
    expected = inactive[sorted(order[:k])]
    got = top_candidates(t, k, lambda b, out: b.grad.abs(), ties=ties, block_bytes=block_rows * cols * 24)
    assert torch.equal(got, expected)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), rows=st.integers(1, 12), cols=st.integers(1, 12),
       levels=st.sampled_from([None, 2, 5]), block_rows=st.integers(1, 13), use_hash=st.booleans())
def test_top_candidates_per_row_equals_a_per_row_sort(seed, rows, cols, levels, block_rows, use_hash):
    t = grid(seed, rows, cols, levels)
    gen = torch.Generator().manual_seed(seed + 1)
    free = (~t.mask).sum(1)
    counts = (torch.rand(rows, generator=gen) * (free + 1).float()).long().clamp(max=free)
    ties = hashed(seed) if use_hash else None
    expected = []
    for r in range(rows):
        cols_free = (~t.mask[r]).nonzero().squeeze(1)
        flat = r * cols + cols_free
        second = ties(flat) if use_hash else -flat
        order = sorted(range(cols_free.numel()),
                       key=lambda i: (float(t.grad[r, cols_free[i]].abs()), int(second[i])), reverse=True)
        expected += sorted(int(flat[i]) for i in order[:int(counts[r])])
    got = top_candidates_per_row(t, counts, lambda b, out: b.grad.abs(), ties=ties, block_bytes=block_rows * cols * 24)
    assert got.tolist() == expected


def test_block_size_comes_from_the_memory_budget(monkeypatch):
    assert rows_per_block(1000, block_bytes=24 * 1000 * 7) == 7
    assert rows_per_block(10**9, block_bytes=1) == 1
    monkeypatch.setenv("REGROW_GROWTH_BLOCK_BYTES", str(24 * 100 * 3))
    assert rows_per_block(100) == 3
    monkeypatch.setenv("REGROW_GROWTH_BLOCK_BYTES", "lots")
    with pytest.raises(ValueError, match="REGROW_GROWTH_BLOCK_BYTES"):
        rows_per_block(100)
    monkeypatch.delenv("REGROW_GROWTH_BLOCK_BYTES")
    assert rows_per_block(100) == row_blocks.GROWTH_BLOCK_BYTES // 2400


# -- the same decisions as the masked backend -------------------------------------------------
def twin_targets(seed: int, rows: int = 30, cols: int = 40, density: float = 0.2):
    """A SparseLinear and a masked nn.Linear with the same active weights."""
    torch.manual_seed(seed)
    layer = SparseLinear(cols, rows, density, bias=False, seed=seed)
    linear = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        linear.weight.copy_(layer.to_dense())
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[layer.active_keys()] = True
    t_s = SparseLinearTarget("w", layer, OptimizerStateMasker(torch.optim.SGD(layer.parameters(), lr=0.1)))
    t_m = MaskedTarget("w", linear.weight, linear, layer.nnz,
                       OptimizerStateMasker(torch.optim.SGD(linear.parameters(), lr=0.1)))
    t_m.set_mask(mask.view(rows, cols))
    return (layer, t_s), (linear, t_m)


@pytest.mark.parametrize("method_name, options", [
    ("rigl", {}), ("dstee", {"c": 0.05}), ("dstee", {"c": 0.0}),
    ("srigl", {}), ("srigl", {"exempt_layers": (), "gamma_sal": 0.9}), ("srigl", {"ablation": False})])
def test_rigl_family_makes_the_masked_backends_decisions(method_name, options):
    (layer, t_s), (linear, t_m) = twin_targets(5)
    methods = {"sparse": make_method(method_name, options), "masked": make_method(method_name, options)}
    for method in methods.values():   # both start from the SparseLinear's own budget and fan-in
        method.attach([t_s])
    gen = torch.Generator().manual_seed(0)
    ever = set(t_s.active_indices().tolist())
    ablated = 0
    for update in range(1, 5):
        x, g = torch.randn(16, 40, generator=gen), torch.randn(16, 30, generator=gen)
        before = set(t_s.active_indices().tolist())
        for (lay, tgt), method in zip(((layer, t_s), (linear, t_m)), methods.values()):
            ctx = UpdateContext(step=10 * update, fraction=0.3, generator=torch.Generator().manual_seed(update), seed=7)
            update_once(lay, tgt, method, x, g, ctx)
        after_s, after_m = set(t_s.active_indices().tolist()), set(t_m.active_indices().tolist())
        assert after_s == after_m, f"update {update}"
        if method_name == "srigl":
            counts = t_s.row_counts()
            fan_in = int(counts.max())
            assert bool(((counts == 0) | (counts == fan_in)).all()) and after_s != before
            ablated += int((counts == 0).sum())
        else:
            assert len(after_s - before) == int(0.3 * len(before)), "k connections must have been rewired"
        ever |= after_s
        torch.testing.assert_close(layer.to_dense(), linear.weight.detach(), atol=0, rtol=0)
    if method_name == "dstee":
        keys_s, n_s = methods["sparse"].visits["w"]
        keys_m, n_m = methods["masked"].visits["w"]
        assert torch.equal(keys_s, keys_m) and torch.equal(n_s, n_m)
        assert set(keys_s.tolist()) == ever, "visit counts are kept for the ever-active keys, and only those"
    if options.get("gamma_sal") == 0.9:
        assert ablated > 0, "the test should exercise ablation"


def test_rigl_grows_the_top_gradients_of_a_sparse_layer():
    """Against an independent reference: the dense gradient delta^T h, top-k among inactive."""
    (layer, t_s), _ = twin_targets(9, rows=24, cols=50, density=0.1)
    x, g = torch.randn(8, 50), torch.randn(8, 24)
    t_s.arm_capture()
    layer(x).backward(g)
    before = layer.active_keys().clone()
    method = make_method("rigl", {})
    ctx = UpdateContext(step=1, fraction=0.5, generator=torch.Generator().manual_seed(0), seed=1)
    k = int(0.5 * layer.nnz)
    method.update(t_s, ctx)
    score = (g.t() @ x).abs().view(-1)
    score[before] = -1
    expected = set(torch.topk(score, k).indices.tolist())
    assert set(layer.active_keys().tolist()) - set(before.tolist()) == expected


@pytest.mark.parametrize("method, options", [("rigl", {}), ("dstee", {}), ("srigl", {"gamma_sal": 0.9})])
def test_rigl_family_trains_always_sparse_layers_end_to_end(method, options):
    model = nn.Sequential(SparseLinear(20, 32, 0.3, seed=1), nn.ReLU(), SparseLinear(32, 3, 0.5, seed=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = regrow.DynamicSparsity(model, opt, method=method, sparsity=0.9, total_steps=40, update_interval=3,
                                 **options)
    x, y = torch.randn(16, 20), torch.randint(0, 3, (16,))
    start = model[0].active_keys().clone()
    nnz = [model[0].nnz]
    for _ in range(9):
        opt.zero_grad()
        # the previous step's loss (and its graph) is still alive during this forward, as in
        # most training loops: a layer whose N changed (SRigL's ablation) must still backprop
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        dst.step()
        nnz.append(model[0].nnz)
    assert dst.stats()["updates"] == 3
    assert not torch.equal(model[0].active_keys(), start), f"{method} rewired nothing"
    assert dst.stats()["itop_rate"] > dst.stats()["density"]
    if method == "srigl":   # constant fan-in; the classifier (last sparsified layer) is never ablated
        counts = model[0].row_indices.bincount(minlength=32)
        assert bool(((counts == 0) | (counts == counts.max())).all())
        assert bool((model[2].row_indices.bincount(minlength=3) > 0).all())
        assert len(set(nnz)) > 1, "the test should change N (ablation)"


# -- memory: a 32k x 32k layer, whose dense gradient would take 4 GiB --------------------------
_MEMORY_SCRIPT = textwrap.dedent("""
    import json, time, torch
    import regrow
    from regrow.nn import _sparse_kernels
    from regrow.nn.sparse_linear import SparseLinear

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

    torch.set_num_threads(1)
    _sparse_kernels.load()
    layer = SparseLinear(32768, 32768, fan_in=16, seed=0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    dst = regrow.DynamicSparsity(layer, opt, method="rigl", sparsity=0.999, total_steps=4, update_interval=1)
    before = layer.active_keys().clone()
    x = torch.randn(4, 32768)
    opt.zero_grad()
    layer(x).square().mean().backward()
    base = status("VmRSS")
    try:   # reset the peak so VmHWM is the update's own (Linux >= 4.0); else it stays an upper bound
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass
    start = time.perf_counter()
    dst.step()
    seconds = time.perf_counter() - start
    changed = int((~torch.isin(layer.active_keys(), before)).sum())
    print(json.dumps({"extra": status("VmHWM") - base, "nnz": layer.nnz, "changed": changed,
                      "k": int(dst.schedule.fraction(1) * layer.nnz), "updates": dst.stats()["updates"],
                      "seconds": seconds}))
""")


@pytest.mark.slow
def test_rigl_update_of_a_32k_by_32k_layer_needs_a_fraction_of_a_dense_gradient():
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["nnz"] == 32768 * 16 and res["updates"] == 1
    assert res["changed"] == res["k"] > 0, "the RigL update must have rewired k connections"
    assert res["extra"] < 512 * 2**20, f"peak extra memory {res['extra'] / 2**20:.0f} MiB (dense gradient: 4096 MiB)"


# -- transparent huge pages for the CLI ------------------------------------------------------
_THP_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
    import regrow, regrow.experiments.cli as cli   # importing allocates no tensor ...
    cli.ask_for_huge_pages()                       # ... so the variable still takes effect
    import torch
    x = torch.ones(64 << 20)
    huge = next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages"))
    print(os.environ["THP_MEM_ALLOC_ENABLE"], huge)
""")


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
        open("/proc/self/smaps_rollup").close()
    except OSError:
        return "unavailable"
    return text.split("[")[1].split("]")[0]


@pytest.mark.skipif(_thp_mode() in ("never", "unavailable"), reason="transparent huge pages are off here")
def test_the_cli_asks_for_huge_pages_before_torch_allocates():
    out = subprocess.run([sys.executable, "-c", _THP_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    value, huge_kib = out.stdout.split()
    assert value == "1" and int(huge_kib) > 0, "a 256 MiB tensor should sit on huge pages"
