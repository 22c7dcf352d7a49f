"""The vision tower's pretraining targets: what each patch of the token grid holds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from data.synthetic.render import object_mask
from data.synthetic.scenes import BACKGROUNDS, DIGITS, OBJECT_COLOURS, OBJECT_SHAPES

# Class-name lists of the dense patch targets; index 0 is "no object" where there is one.
COLOURS: tuple[str, ...] = ("none", *OBJECT_COLOURS)
SHAPES: tuple[str, ...] = ("none", *OBJECT_SHAPES, "glyph")
GLYPHS: tuple[str, ...] = ("none", *DIGITS)
SIZE_CLASSES: tuple[str, ...] = ("none", "small", "medium", "large")

PATCH_COVER_FRACTION = 0.15


def patch_targets(
    meta: Mapping[str, Any], grid: int = 12, image_size: int = 96
) -> dict[str, np.ndarray]:
    """Dense per-patch class targets for pretraining the vision tower (CLIP's role).

    Each object owns the patch holding its centre (so a few-pixel object is never lost; at
    the default 12x12 grid no two centres share a patch). Every other patch goes to the
    object covering most of its pixels among those covering at least 15 % of it, else to
    none. Arrays (grid, grid), int64:
    `colour` (COLOURS index), `shape` (SHAPES), `glyph` (GLYPHS), `size` (SIZE_CLASSES),
    all 0 where no object is assigned; `centre` 1 where an object's centre lies; and
    `background`, a 0-d array holding the BACKGROUNDS index.
    """
    size = int(meta.get("image_size", image_size))
    if size != image_size:
        raise ValueError(f"scene is {size} px, patch_targets was asked for {image_size} px")
    if image_size % grid:
        raise ValueError(f"image_size {image_size} is not a multiple of grid {grid}")
    p = image_size // grid
    targets = {
        k: np.zeros((grid, grid), dtype=np.int64)
        for k in ("colour", "shape", "glyph", "size", "centre")
    }
    objects = list(meta["objects"])
    if objects:
        cover = np.stack(
            [object_mask(o, image_size).reshape(grid, p, grid, p).sum(axis=(1, 3)) for o in objects]
        )
        eligible = cover >= PATCH_COVER_FRACTION * p * p
        score = np.where(eligible, cover, -1)
        for k, o in enumerate(objects):
            r = min(int(o["cy"] // p), grid - 1)
            c = min(int(o["cx"] // p), grid - 1)
            score[k, r, c] = cover[k, r, c] + p * p
            targets["centre"][r, c] = 1
        owner = score.argmax(axis=0)
        assigned = score.max(axis=0) >= 0
        lookup = {
            "colour": [COLOURS.index(o["colour"]) for o in objects],
            "shape": [SHAPES.index(o["shape"]) for o in objects],
            "glyph": [GLYPHS.index(o["glyph"]) if o["glyph"] else 0 for o in objects],
            "size": [SIZE_CLASSES.index(o["size_class"]) for o in objects],
        }
        for key, values in lookup.items():
            targets[key] = np.where(assigned, np.asarray(values, dtype=np.int64)[owner], 0)
    targets["background"] = np.asarray(BACKGROUNDS.index(meta["background"]), dtype=np.int64)
    return targets
