"""Multi-head attention with always-sparse projections (q, k, v and output as SparseLinear).

A drop-in for ``nn.MultiheadAttention`` (same call: ``attn(query, key, value,
key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True,
is_causal=False)`` returning ``(output, weights or None)``): the four projections are
:class:`SparseLinear` layers, so no ``[embed_dim, embed_dim]`` weight exists, and the attention
itself goes through ``F.scaled_dot_product_attention``. The attention weights are only
computed (explicitly, with the same masks) when ``need_weights=True``.

Masks follow ``nn.MultiheadAttention``: a bool ``key_padding_mask`` [B, S] or ``attn_mask``
[L, S] / [B * heads, L, S] marks with True the positions *not* to attend to; float masks are
added to the scores. ``is_causal=True`` without an ``attn_mask`` applies the causal mask
(with one, the mask is taken to be the causal one, as nn.MultiheadAttention does).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .sparse_linear import SparseLinear


class SparseMultiheadAttention(nn.Module):
    """Attention whose projections are :class:`SparseLinear` layers (see the module docstring).

    Args:
        q_proj, k_proj, v_proj: SparseLinear ``embed_dim -> embed_dim`` (k and v may read
            ``kdim`` / ``vdim`` inputs).
        out_proj: SparseLinear ``embed_dim -> embed_dim``.
        num_heads: heads; ``embed_dim`` must be divisible by it.
        dropout: dropout on the attention weights while training.
        batch_first: inputs and outputs are [B, L, E] (else [L, B, E]).
    """

    #: no packed in_proj weight exists; torch's fused encoder fast path (which reads packed
    #: dense weights) checks these two attributes and is then skipped
    _qkv_same_embed_dim = False
    in_proj_bias = None

    def __init__(self, q_proj: SparseLinear, k_proj: SparseLinear, v_proj: SparseLinear,
                 out_proj: SparseLinear, num_heads: int, *, dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        embed_dim = q_proj.out_features
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        for name, proj in (("k_proj", k_proj), ("v_proj", v_proj)):
            if proj.out_features != embed_dim:
                raise ValueError(f"{name} gives {proj.out_features} features, q_proj {embed_dim}")
        if out_proj.in_features != embed_dim:
            raise ValueError(f"out_proj reads {out_proj.in_features} features, the heads give {embed_dim}")
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim, self.vdim = k_proj.in_features, v_proj.in_features
        self.head_dim = embed_dim // num_heads
        self.dropout, self.batch_first = float(dropout), batch_first

    @classmethod
    def from_attention(cls, mha: nn.MultiheadAttention, make: "callable") -> "SparseMultiheadAttention":
        """Convert ``mha``; ``make(part, weight [out, in], bias or None)`` builds each projection
        (part: "q_proj", "k_proj", "v_proj", "out_proj")."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn cannot be converted "
                             "to SparseMultiheadAttention")
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.split(e)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = (None, None, None) if mha.in_proj_bias is None else mha.in_proj_bias.split(e)
        parts = [make(part, w, b) for part, w, b in zip(("q_proj", "k_proj", "v_proj"), weights, biases)]
        out = make("out_proj", mha.out_proj.weight, mha.out_proj.bias)
        return cls(*parts, out, mha.num_heads, dropout=mha.dropout, batch_first=mha.batch_first)

    @classmethod
    def from_masked(cls, mha: nn.MultiheadAttention) -> "SparseMultiheadAttention":
        """The same attention with its non-zero weights as always-sparse projections (reads
        each dense weight once: for tests and conversions of a trained masked model)."""
        return cls.from_attention(mha, lambda part, w, b: SparseLinear.from_dense(w.detach(), b))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:   # unbatched [L, E]
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, lq, _ = query.shape
        ls = key.shape[1]
        if key is query and value is query:
            # self-attention: q, k and v read one feature-major copy of the input, which each
            # SparseLinear then uses (and keeps for its backward) as it is, instead of three
            query = key = value = feature_major(query)
        q, k, v = (self._heads(proj(x), b) for proj, x in ((self.q_proj, query), (self.k_proj, key),
                                                           (self.v_proj, value)))
        mask = self._mask(key_padding_mask, attn_mask, is_causal, b, lq, ls, q.dtype, q.device)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, training=self.training) @ v
            weights = weights.mean(1) if average_attn_weights else weights
            if not batched:
                weights = weights.squeeze(0)
        else:
            causal = is_causal and attn_mask is None and key_padding_mask is None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask,
                                                 dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _heads(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """[B, L, E] -> [B, heads, L, head_dim], head_dim contiguous: SparseLinear's outputs are
        feature-major, and scaled_dot_product_attention takes its fused (flash) kernels only for
        a unit last stride; otherwise it falls back to the math path, which keeps the [L, S]
        scores of every head for the backward."""
        return x.contiguous().reshape(b, -1, self.num_heads, self.head_dim).transpose(1, 2)

    def _mask(self, key_padding_mask, attn_mask, is_causal, b, lq, ls, dtype, device) -> torch.Tensor | None:
        """One additive float mask broadcastable to [B, heads, L, S] (None when nothing is masked)."""
        mask = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(lq, ls, dtype=torch.bool, device=device).triu(1)
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            if mask.dim() == 3:   # [B * heads, L, S]
                mask = mask.view(b, self.num_heads, lq, ls)
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, dtype).view(b, 1, 1, ls)
            mask = pad if mask is None else mask + pad
        return mask

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, " \
               f"batch_first={self.batch_first}"


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention's mask convention as an additive float mask (True: -inf)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def feature_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., E] as a view of the same shape whose memory is laid out [E, rest]: the layout
    SparseLinear computes in (it takes such an input without copying it)."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(0) == 1 and flat.stride(1) == max(1, flat.shape[0]):
        return x   # already feature-major
    return flat.t().contiguous().t().reshape(x.shape)
