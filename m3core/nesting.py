"""The ways of nesting visual tokens: M3 pooling and MQT latent queries (two placements).

Each acts on a grid that `NestedLMM.encode` computes once per image, and keeps what any scale
needs: the grid itself (pooling) or all M query outputs (a scale m is the first m, since no
query attends to another). Any scale of an encoded image then costs a pooling or a slice, never
a second vision pass.
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


class QueryBlock(nn.Module):
    """M learned latent queries cross-attend to the projected grid in one pre-norm transformer
    block (attention, then an MLP, both residual), placed after the projector.

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


def mae_sincos_2d(dim: int, side: int) -> torch.Tensor:
    """(side*side, dim) fixed 2-D sine/cosine embedding of row-major grid cells, as MAE and
    MQT-LLaVA write it: the first half encodes the column, the second half the row, each half
    as [sin, cos] of the position times 1 / 10000^(k / (dim/4))."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    halves = []
    for axis in (cols.flatten(), rows.flatten()):
        angles = axis[:, None] * omega[None, :]
        halves.append(torch.cat([angles.sin(), angles.cos()], dim=1))
    return torch.cat(halves, dim=1).float()


class Resampler(nn.Module):
    """MQT-LLaVA's projector: M learned queries read the vision tower's features in one
    attention and a linear map takes them to the LLM's width.

    In one `nn.MultiheadAttention` over the tower's width C:
    - queries: ln_q(query[:m] + pos_embed[:m]), the learned queries at their own grid cells;
    - keys: ln_k(pos_embed resized bicubically to the tower's G x G grid), the cells' positions
      only, so the attention weights are the same for every image;
    - values: ln_v(features), the tower's features of the image.
    The output times `proj` (C x D) is the visual tokens. No query attends to another, so the
    first m outputs do not depend on how many run.
    """

    def __init__(
        self, kv_dim: int, embed_dim: int, num_queries: int, num_heads: int, grid_side: int
    ) -> None:
        super().__init__()
        side = math.isqrt(num_queries)
        self.grid_side = grid_side
        self.register_buffer("pos_embed", mae_sincos_2d(kv_dim, side))
        self.query = nn.Parameter(torch.randn(num_queries, kv_dim) * 0.02)
        self.attn = nn.MultiheadAttention(kv_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(kv_dim, eps=1e-6)
        self.ln_k = nn.LayerNorm(kv_dim, eps=1e-6)
        self.ln_v = nn.LayerNorm(kv_dim, eps=1e-6)
        self.proj = nn.Parameter(embed_dim**-0.5 * torch.randn(kv_dim, embed_dim))

    @property
    def num_queries(self) -> int:
        return self.query.shape[0]

    def key_positions(self) -> torch.Tensor:
        """(G*G, C) the position embedding resized to the tower's grid (float32 bicubic)."""
        side = math.isqrt(self.pos_embed.shape[0])
        maps = self.pos_embed.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        size = (self.grid_side, self.grid_side)
        resized = F.interpolate(maps, size=size, mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).flatten(0, 2).to(self.pos_embed.dtype)

    def forward(self, features: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        m = self.num_queries if num_tokens is None else num_tokens
        n = features.shape[0]
        queries = self.ln_q(self.query[:m] + self.pos_embed[:m]).expand(n, -1, -1)
        keys = self.ln_k(self.key_positions().to(features.dtype)).expand(n, -1, -1)
        attended, _ = self.attn(
            queries.to(features.dtype), keys, self.ln_v(features), need_weights=False
        )
        return attended @ self.proj.to(attended.dtype)
