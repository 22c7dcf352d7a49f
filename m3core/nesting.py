"""The two ways of nesting visual tokens: M3 pooling and MQT latent queries.

Both act on the projected grid (N, G*G, D) that `NestedLMM.encode` computes once per image, so
any scale of an encoded image costs a pooling or a slice, never a second vision pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def pool_sides(grid_side: int) -> list[int]:
    """Grid sides along M3's chain: halve while even, then jump to 1 (24 -> 12 -> 6 -> 3 -> 1)."""
    sides = [grid_side]
    while sides[-1] > 1:
        side = sides[-1]
        sides.append(side // 2 if side % 2 == 0 else 1)
    return sides


def pool_scales(grid_side: int) -> tuple[int, ...]:
    """Ascending token counts of the pooled scales of a grid_side x grid_side grid."""
    return tuple(sorted(side * side for side in pool_sides(grid_side)))


def pool_grid(grid: torch.Tensor, scale: int) -> torch.Tensor:
    """Average-pool (N, G*G, D) grid tokens to (N, scale, D), kernel = stride = G / sqrt(scale)."""
    n, length, dim = grid.shape
    side = math.isqrt(length)
    target = math.isqrt(scale)
    if side * side != length or target * target != scale or side % target:
        raise ValueError(f"cannot pool a {length}-token grid to {scale} tokens")
    if target == side:
        return grid
    if target == 1:  # the same average, without avg_pool2d's layout change (3x faster on CPU)
        return grid.mean(1, keepdim=True)
    maps = grid.transpose(1, 2).reshape(n, dim, side, side)
    kernel = side // target
    pooled = F.avg_pool2d(maps, kernel_size=kernel, stride=kernel)
    return pooled.flatten(2).transpose(1, 2)


def sinusoid_2d(side: int, dim: int, scale: float = 0.1) -> torch.Tensor:
    """(side*side, dim) fixed 2-D sine/cosine embedding of row-major grid cells (ViT-MAE style)."""
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(1, quarter)))
    coords = torch.arange(side, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for axis in (rows.flatten(), cols.flatten()):
        angles = axis[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    embedding = torch.cat(parts, dim=1)
    padded = torch.zeros(side * side, dim)
    padded[:, : embedding.shape[1]] = embedding
    return scale * padded


class QueryNesting(nn.Module):
    """MQT's nesting: M learned latent queries cross-attend to the projected grid.

    The queries do not attend to each other, so the first m outputs are the same whether m or all
    M queries run: encoding computes all M once and a scale m is a slice.
    """

    def __init__(self, dim: int, num_queries: int, num_heads: int = 4) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    def forward(self, grid: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        m = self.num_queries if num_tokens is None else num_tokens
        queries = self.queries[:m].unsqueeze(0).expand(grid.shape[0], -1, -1).to(grid.dtype)
        kv = self.norm_kv(grid)
        attended, _ = self.attn(self.norm_q(queries), kv, kv, need_weights=False)
        x = queries + attended
        return x + self.mlp(self.norm_mlp(x))
