"""A small Vision Transformer (Dosovitskiy et al. 2021) sized for CPU training."""

from __future__ import annotations

import torch
from torch import nn

from ._shapes import image_shape


class Block(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding (a strided Conv2d), class token, learned position embedding,
    ``depth`` pre-norm blocks, final LayerNorm and a linear head on the class token."""

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
    ) -> None:
        super().__init__()
        c, h, w = in_shape
        if patch_size < 1 or h % patch_size or w % patch_size:
            raise ValueError(f"vit patch_size {patch_size} must divide the image size {h}x{w}")
        if dim % heads:
            raise ValueError(f"vit dim {dim} must be divisible by heads {heads}")
        if depth < 1:
            raise ValueError(f"vit depth must be at least 1, got {depth}")
        num_patches = (h // patch_size) * (w // patch_size)
        self.patch_embed = nn.Conv2d(c, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, patches, dim]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.dropout(torch.cat([cls, x], dim=1) + self.pos_embed)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def _default_patch(h: int, w: int) -> int:
    """Largest of 4, 2, 1 that divides both sides (4 gives 64 patches on 32x32, 49 on 28x28)."""
    return next(p for p in (4, 2, 1) if h % p == 0 and w % p == 0)


def vit(
    num_classes: int,
    in_shape: tuple[int, ...],
    patch_size: int | None = None,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 2.0,
    dropout: float = 0.0,
) -> ViT:
    """Small ViT; ``patch_size=None`` picks 4, 2 or 1, whichever first divides the image."""
    shape = image_shape(in_shape, "vit")
    patch = _default_patch(shape[1], shape[2]) if patch_size is None else int(patch_size)
    return ViT(shape, num_classes, patch, dim, depth, heads, mlp_ratio, dropout)
