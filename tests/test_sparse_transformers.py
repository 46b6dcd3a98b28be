"""Always-sparse transformers: SparseMultiheadAttention against the masked nn.MultiheadAttention
(masks, causal, both layouts, attention weights, gradients), sparsify on encoder layers and the
built-in ViT, gradient capture on [batch, tokens, features] activations, `--backend sparse
--model vit`."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import regrow
from regrow.backends.masked import MaskedTarget
from regrow.backends.sparse import SparseLinearTarget
from regrow.core.optim_state import OptimizerStateMasker
from regrow.core.row_blocks import row_blocks
from regrow.nn import SparseConv2d, SparseLinear, SparseMultiheadAttention, sparsify


def masked_attention(seed: int, embed: int = 16, heads: int = 4, batch_first: bool = True, density: float = 0.4):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(embed, heads, batch_first=batch_first)
    with torch.no_grad():
        for p in (mha.in_proj_weight, mha.out_proj.weight):
            p.mul_((torch.rand_like(p) < density).float())
        mha.in_proj_bias.normal_()
    return mha


def masks(batch: int, length: int):
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[0, length - 2:] = True
    pad[-1, 1] = True
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    return pad, causal


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", ["plain", "padding", "causal", "causal+padding", "float mask"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_sparse_attention_equals_the_masked_original(batch_first, case, need_weights):
    mha = masked_attention(1, batch_first=batch_first)
    sparse = SparseMultiheadAttention.from_masked(mha)
    assert sparse.q_proj.nnz + sparse.k_proj.nnz + sparse.v_proj.nnz == int((mha.in_proj_weight != 0).sum())
    b, length = 3, 7
    x = torch.randn(b, length, 16) if batch_first else torch.randn(length, b, 16)
    pad, causal = masks(b, length)
    kwargs = {"plain": {}, "padding": {"key_padding_mask": pad},
              "causal": {"attn_mask": causal, "is_causal": True},
              "causal+padding": {"attn_mask": causal, "key_padding_mask": pad, "is_causal": True},
              "float mask": {"attn_mask": torch.randn(length, length)}}[case]
    x_m, x_s = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_m, w_m = mha(x_m, x_m, x_m, need_weights=need_weights, **kwargs)
    out_s, w_s = sparse(x_s, x_s, x_s, need_weights=need_weights, **kwargs)
    torch.testing.assert_close(out_s, out_m, atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(w_s, w_m, atol=1e-5, rtol=1e-5)
    else:
        assert w_s is None and w_m is None
    g = torch.randn_like(out_m)
    out_m.backward(g)
    out_s.backward(g)
    torch.testing.assert_close(x_s.grad, x_m.grad, atol=1e-5, rtol=1e-5)
    # the projections' value gradients are the masked weight gradients at the active entries
    dense_q = mha.in_proj_weight.grad[:16]
    q = sparse.q_proj
    torch.testing.assert_close(q.values.grad, dense_q[q.row_indices.long(), q.col_indices.long()], atol=1e-5, rtol=1e-5)


def test_is_causal_without_a_mask_is_the_causal_mask():
    mha = masked_attention(2)
    sparse = SparseMultiheadAttention.from_masked(mha)
    x = torch.randn(2, 6, 16)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    expected, _ = mha(x, x, x, attn_mask=causal, need_weights=False)
    for need_weights in (False, True):
        out, _ = sparse(x, x, x, is_causal=True, need_weights=need_weights)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_self_attention_makes_one_feature_major_copy_of_its_input_for_q_k_and_v():
    """q, k and v read (and keep for the backward) one [E, B * L] copy of the input, not three
    (the output projection makes its own of the attention output: two in all, four before)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CopiesOfInput(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.count = shape, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default) and \
                    tuple(out.shape) == self.shape and out.is_contiguous():
                self.count += 1
            return out

    mha = masked_attention(3)
    sparse = SparseMultiheadAttention.from_masked(mha)
    x = torch.randn(3, 7, 16, requires_grad=True)
    expected, _ = mha(x, x, x, need_weights=False)
    with CopiesOfInput((16, 21)) as copies:
        out, _ = sparse(x, x, x, need_weights=False)
    assert copies.count == 2
    key, value = x.clone(), x.clone()
    with CopiesOfInput((16, 21)) as copies:   # key and value other tensors: a copy per projection
        sparse(x, key, value, need_weights=False)
    assert copies.count == 4
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_expected,) = torch.autograd.grad(expected, x, g)
    torch.testing.assert_close(gx, gx_expected, atol=1e-5, rtol=1e-5)


def test_attention_kernel_gets_head_dim_contiguous_inputs(monkeypatch):
    """scaled_dot_product_attention's fused CPU/GPU kernels need a unit last stride; SparseLinear's
    outputs are feature-major, so the heads are made contiguous first (else the math path keeps
    every head's scores for the backward)."""
    import regrow.nn.sparse_attention as sa
    seen = []
    sdpa = sa.F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append([t.stride(-1) for t in (q, k, v)])
        return sdpa(q, k, v, **kwargs)
    monkeypatch.setattr(sa.F, "scaled_dot_product_attention", recording)
    sparse = SparseMultiheadAttention.from_masked(masked_attention(4))
    x = torch.randn(2, 5, 16)
    sparse(x, x, x, need_weights=False)
    assert seen == [[1, 1, 1]]


def test_converted_encoder_layer_equals_the_masked_layer_in_train_and_eval():
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    with torch.no_grad():
        for lin in (layer.linear1, layer.linear2):
            lin.weight.mul_((torch.rand_like(lin.weight) < 0.3).float())
    mha = layer.self_attn
    with torch.no_grad():
        mha.in_proj_weight.mul_((torch.rand_like(mha.in_proj_weight) < 0.3).float())
    import copy
    sparse = copy.deepcopy(layer)
    sparse.self_attn = SparseMultiheadAttention.from_masked(mha)
    sparse.linear1 = SparseLinear.from_dense(layer.linear1.weight.detach(), layer.linear1.bias.detach())
    sparse.linear2 = SparseLinear.from_dense(layer.linear2.weight.detach(), layer.linear2.bias.detach())
    x = torch.randn(3, 7, 16)
    pad, causal = masks(3, 7)
    for train in (True, False):   # eval would take torch's fused fast path, which needs dense weights
        layer.train(train)
        sparse.train(train)
        for kwargs in ({}, {"src_key_padding_mask": pad}, {"src_mask": causal, "is_causal": True}):
            expected = layer(x, **kwargs)
            got = sparse(x, **kwargs)
            if not train and "src_key_padding_mask" in kwargs:
                # torch's fast path returns padded positions as zeros; compare the others
                keep = ~pad
                expected, got = expected[keep], got[keep]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sparsify_converts_attention_and_feed_forward_layers_of_a_transformer():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True),
                                  num_layers=2, enable_nested_tensor=False)
    sparsify(model, sparsity=0.8)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "MultiheadAttention" not in kinds and "Linear" not in kinds
    assert sum(isinstance(m, SparseMultiheadAttention) for m in model.modules()) == 2
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 2 * (4 + 2)
    x = torch.randn(2, 5, 16)
    assert model(x).shape == (2, 5, 16)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5, 16)


def test_sparsify_makes_the_builtin_vit_always_sparse_and_it_trains_with_rigl():
    from regrow.models import build

    model = build("vit", 10, (1, 8, 8), dim=16, depth=1, heads=2)
    sparsify(model, sparsity=0.8)
    dense_weights = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.MultiheadAttention))]
    assert dense_weights == []
    assert isinstance(model.patch_embed, SparseConv2d), "the patch embedding is always-sparse too"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = regrow.DynamicSparsity(model, opt, method="rigl", sparsity=0.8, total_steps=20, update_interval=2)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    q = model.blocks[0].attn.q_proj
    before = q.active_keys().clone()
    for _ in range(4):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        dst.step()
    assert dst.stats()["updates"] == 2
    assert not torch.equal(q.active_keys(), before), "the attention projections were rewired"


# -- capture on [batch, tokens, features] ------------------------------------------------------
def test_three_dimensional_activations_give_the_gradient_summed_over_batch_and_tokens():
    torch.manual_seed(4)
    layer = SparseLinear(12, 10, 0.3, bias=False, seed=4)
    linear = nn.Linear(12, 10, bias=False)
    with torch.no_grad():
        linear.weight.copy_(layer.to_dense())
    t_s = SparseLinearTarget("w", layer, OptimizerStateMasker(torch.optim.SGD(layer.parameters(), lr=0.1)))
    t_m = MaskedTarget("w", linear.weight, linear, layer.nnz, OptimizerStateMasker(torch.optim.SGD(linear.parameters(), lr=0.1)))
    mask = torch.zeros(120, dtype=torch.bool)
    mask[layer.active_keys()] = True
    t_m.set_mask(mask.view(10, 12))
    x, g = torch.randn(3, 5, 12), torch.randn(3, 5, 10)
    for lay, tgt in ((layer, t_s), (linear, t_m)):
        tgt.arm_capture()
        lay(x).backward(g)
        tgt.snapshot_grad()
    dense = torch.einsum("bto,bti->oi", g, x)   # independent: sum over batch and tokens
    flat = torch.arange(120)
    torch.testing.assert_close(t_s.grad_at(flat).view(10, 12), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_m.grad_at(flat).view(10, 12), dense, atol=1e-5, rtol=1e-5)
    blocks = torch.cat([b.grad.clone() for b in row_blocks(t_s, block_bytes=24 * 12 * 3)])
    torch.testing.assert_close(blocks, dense, atol=1e-5, rtol=1e-5)
    for tgt in (t_s, t_m):   # GraBo / GraEst read (h, delta) with batch and tokens flattened
        h, delta = tgt.activations()
        assert h.shape == (15, 12) and delta.shape == (15, 10)


@pytest.mark.parametrize("method, options", [("gse", {"sampling": "grabo"}), ("gse", {"sampling": "graest"}),
                                             ("dstee", {}), ("srigl", {})])
def test_growth_methods_run_on_a_sparsified_transformer(method, options):
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True),
                                  num_layers=1, enable_nested_tensor=False)
    sparsify(model, sparsity=0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dst = regrow.DynamicSparsity(model, opt, method=method, sparsity=0.7, total_steps=20, update_interval=2, **options)
    x = torch.randn(4, 6, 16)
    for _ in range(2):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        dst.step()
    assert dst.stats()["updates"] == 1
    assert dst.stats()["itop_rate"] > dst.stats()["density"]


def test_cli_config_accepts_the_vit_on_the_sparse_backend():
    from regrow.experiments.config import TrainConfig
    from regrow.experiments.setup import build_model

    config = TrainConfig(backend="sparse", model="vit", method="rigl", dataset="digits").validate()
    model = build_model(config, (1, 8, 8), 10)
    assert any(isinstance(m, SparseMultiheadAttention) for m in model.modules())


def test_flops_of_a_sparsified_vit_count_the_same_dense_work_as_the_original():
    from regrow.experiments.flops import measure_layer_flops
    from regrow.models import build

    torch.manual_seed(0)
    dense = build("vit", 10, (1, 8, 8), dim=16, depth=2, heads=2)
    torch.manual_seed(0)
    sparse = sparsify(build("vit", 10, (1, 8, 8), dim=16, depth=2, heads=2), sparsity=0.8)
    a, b = measure_layer_flops(dense, (1, 8, 8)), measure_layer_flops(sparse, (1, 8, 8))
    assert b.other == pytest.approx(a.other) and a.other > 0, "attention products (q k^T, weights @ v)"
    assert sum(b.per_param.values()) == pytest.approx(sum(a.per_param.values()))
    assert "blocks.0.attn.q_proj.values" in b.per_param
