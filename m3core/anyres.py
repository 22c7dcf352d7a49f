"""LLaVA-NeXT's anyres merge, at M3's scales.

An image is resized into the best of the `image_grid_pinpoints` resolutions, cut into rows x
cols crops of the tower's input size, and a squashed copy of the whole image (the base crop)
goes first. M3 average-pools every crop's projected G x G grid to the scale's k x k BEFORE
the merge: the base crop's k*k tokens, then the crops' pooled grids laid side by side
(rows*k, cols*k), the padding that the resize added cut off again (unpad), and an
`image_newline` token after every row. The token count of an image thus depends on its crop
layout; at k = G this is transformers' LlavaNext merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)


def crop_layout(image_size: Sequence[int], pinpoints: list, crop: int) -> tuple[int, int]:
    """(rows, cols) of crops for an image of (height, width)."""
    rows, cols = get_anyres_image_grid_shape([int(s) for s in image_size], pinpoints, crop)
    return int(rows), int(cols)


def num_crops(image_size: Sequence[int], pinpoints: list, crop: int) -> int:
    """Crops the tower sees for one image: the base crop plus rows x cols."""
    rows, cols = crop_layout(image_size, pinpoints, crop)
    return 1 + rows * cols


def merged_rows(side: int, rows: int, cols: int, image_size: Sequence[int]) -> tuple[int, int]:
    """(height, width) of the crops' merged k-side grid after the unpad step."""
    shape = unpad_image(torch.empty(0, rows * side, cols * side), [int(s) for s in image_size])
    return int(shape.shape[1]), int(shape.shape[2])


def anyres_tokens(scale: int, image_size: Sequence[int], pinpoints: list, crop: int) -> int:
    """Visual tokens of one image at `scale` tokens per crop, newline tokens included."""
    side = math.isqrt(scale)
    rows, cols = crop_layout(image_size, pinpoints, crop)
    height, width = merged_rows(side, rows, cols, image_size)
    return scale + height * (width + 1)


def merge_crops(
    pooled: torch.Tensor,
    rows: int,
    cols: int,
    image_size: Sequence[int],
    newline: torch.Tensor,
) -> torch.Tensor:
    """(1 + rows*cols, k*k, D) pooled crops of one image -> its (T, D) visual tokens."""
    side = math.isqrt(pooled.shape[1])
    base, crops = pooled[0], pooled[1 : 1 + rows * cols]
    dim = pooled.shape[-1]
    grid = crops.reshape(rows, cols, side, side, dim).permute(4, 0, 2, 1, 3)
    grid = unpad_image(grid.reshape(dim, rows * side, cols * side), [int(s) for s in image_size])
    column = newline.to(grid.dtype)[:, None, None].expand(dim, grid.shape[1], 1)
    grid = torch.cat([grid, column], dim=-1)
    return torch.cat([base, grid.flatten(1, 2).transpose(0, 1)], dim=0)
