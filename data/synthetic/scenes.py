"""Scene sampling: a background plus a few non-overlapping objects, each wholly inside one
image quadrant, drawn from a seed so that any image can be made again from its seed alone.

Object sizes vary per image, from a few pixels to a quadrant's width: the same question is
answerable from a few pooled tokens on one image and needs the full token grid on another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data.synthetic.render import GlyphCache, glyph_ink, object_mask

SPLITS: tuple[str, ...] = ("train", "calib", "test")

OBJECT_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
OBJECT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIGITS: tuple[str, ...] = tuple("0123456789")
BACKGROUNDS: tuple[str, ...] = ("black", "white", "gray", "cyan")
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")

# Sizes in px at the reference 96 px image (scaled for other sizes). Shapes: side or
# diameter; glyphs: font size. Measured on the tiny model: 6-10 px shapes and 11-16 px digits
# are learnable at 144 tokens (5 px digits are not); "large" ones survive heavy pooling.
REFERENCE_SIZE = 96
SHAPE_SIZES: dict[str, tuple[int, int]] = {"small": (6, 10), "medium": (13, 20), "large": (24, 40)}
GLYPH_SIZES: dict[str, tuple[int, int]] = {"small": (11, 16), "medium": (18, 24), "large": (28, 40)}
EDGE_MARGIN = 2  # px between an object and its quadrant's borders
OBJECT_GAP = 3  # px between any two objects

MAX_SHAPES = 5
MAX_GLYPHS = 3


def _scale(image_size: int, px: float) -> int:
    return max(1, round(px * image_size / REFERENCE_SIZE))


def _quadrant_boxes(image_size: int) -> dict[str, tuple[int, int, int, int]]:
    h = image_size // 2
    s = image_size
    return {
        "top left": (0, 0, h, h),
        "top right": (h, 0, s, h),
        "bottom left": (0, h, h, s),
        "bottom right": (h, h, s, s),
    }


def quadrant_of(bbox: Sequence[int], image_size: int) -> str | None:
    """The quadrant wholly containing a box [x0, y0, x1, y1) (x1, y1 exclusive), else None."""
    for name, (qx0, qy0, qx1, qy1) in _quadrant_boxes(image_size).items():
        if bbox[0] >= qx0 and bbox[1] >= qy0 and bbox[2] <= qx1 and bbox[3] <= qy1:
            return name
    return None


def _size_class(kind: str, size: int, image_size: int) -> str:
    ranges = GLYPH_SIZES if kind == "glyph" else SHAPE_SIZES
    for name in ("small", "medium"):
        if size <= _scale(image_size, ranges[name][1]):
            return name
    return "large"


def _draw_size(rng: np.random.Generator, kind: str, size_class: str, image_size: int) -> int:
    lo, hi = (GLYPH_SIZES if kind == "glyph" else SHAPE_SIZES)[size_class]
    return int(rng.integers(_scale(image_size, lo), _scale(image_size, hi) + 1))


def _place(
    rng: np.random.Generator,
    width: int,
    height: int,
    placed: list[list[int]],
    image_size: int,
    tries: int = 40,
) -> list[int] | None:
    """A random box inside one quadrant that keeps OBJECT_GAP from every placed box."""
    quads = list(_quadrant_boxes(image_size).values())
    margin = _scale(image_size, EDGE_MARGIN)
    gap = _scale(image_size, OBJECT_GAP)
    for _ in range(tries):
        qx0, qy0, qx1, qy1 = quads[int(rng.integers(len(quads)))]
        span_x = (qx1 - margin - width) - (qx0 + margin)
        span_y = (qy1 - margin - height) - (qy0 + margin)
        if span_x < 0 or span_y < 0:
            return None
        x0 = qx0 + margin + int(rng.integers(span_x + 1))
        y0 = qy0 + margin + int(rng.integers(span_y + 1))
        box = [x0, y0, x0 + width, y0 + height]
        if all(
            box[2] + gap <= o[0]
            or o[2] + gap <= box[0]
            or box[3] + gap <= o[1]
            or o[3] + gap <= box[1]
            for o in placed
        ):
            return box
    return None


def _sample_objects(
    rng: np.random.Generator, image_size: int, cache: GlyphCache
) -> list[dict[str, Any]]:
    """Draw object specs, then place them largest first; an object that finds no room is
    left out of the scene (it never exists in meta, so it is never counted)."""
    regime = rng.choice(["small", "mixed", "large"], p=[0.3, 0.3, 0.4])
    n_shapes = 1 + int(rng.choice(MAX_SHAPES, p=[0.1, 0.15, 0.25, 0.25, 0.25]))
    has_anchor = rng.random() < 0.5
    specs: list[tuple[str, str]] = []  # (kind, size class)
    for i in range(n_shapes):
        if i == 0 and has_anchor:
            cls = "large"
        elif regime == "small":
            cls = "small"
        elif regime == "large":
            cls = "medium" if has_anchor else str(rng.choice(["medium", "large"], p=[0.6, 0.4]))
        else:
            cls = str(rng.choice(["small", "medium", "large"], p=[0.5, 0.35, 0.15]))
        specs.append(("shape", cls))
    n_glyphs = int(rng.choice(MAX_GLYPHS + 1, p=[0.4, 0.3, 0.15, 0.15]))
    digits = [DIGITS[int(d)] for d in rng.choice(len(DIGITS), n_glyphs, replace=False)]
    for _ in digits:
        specs.append(("glyph", str(rng.choice(["small", "medium", "large"], p=[0.5, 0.2, 0.3]))))

    drawn = []
    for kind, cls in specs:
        size = _draw_size(rng, kind, cls, image_size)
        colour = OBJECT_COLOURS[int(rng.integers(len(OBJECT_COLOURS)))]
        if kind == "glyph":
            glyph = digits.pop()
            width, height = glyph_ink(glyph, size, cache).size
            shape = "glyph"
        else:
            glyph = None
            width = height = size
            shape = OBJECT_SHAPES[int(rng.integers(len(OBJECT_SHAPES)))]
        drawn.append((max(width, height), kind, shape, colour, size, glyph, width, height))
    drawn.sort(key=lambda d: -d[0])

    objects: list[dict[str, Any]] = []
    placed: list[list[int]] = []
    for _, kind, shape, colour, size, glyph, width, height in drawn:
        box = _place(rng, width, height, placed, image_size)
        if box is None:
            continue
        placed.append(box)
        obj: dict[str, Any] = {
            "kind": kind,
            "shape": shape,
            "colour": colour,
            "size": size,
            "size_class": _size_class(kind, size, image_size),
            "cx": (box[0] + box[2]) / 2,
            "cy": (box[1] + box[3]) / 2,
            "bbox": box,
            "glyph": glyph,
            "quadrant": quadrant_of(box, image_size),
        }
        objects.append(obj)
    return objects


def _scene_key(background: str, objects: Sequence[Mapping[str, Any]]) -> str:
    items = sorted(
        json.dumps([o["kind"], o["shape"], o["colour"], o["size"], o["bbox"], o["glyph"]])
        for o in objects
    )
    return json.dumps([background, items])


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return SPLITS.index(split)


def split_scene_seed(split: str, index: int, seed: int) -> int:
    """A distinct integer seed per (base seed, split, image index)."""
    if seed < 0 or not 0 <= index < 2**32:
        raise ValueError("seed must be >= 0 and index in [0, 2**32)")
    return ((seed * len(SPLITS) + _split_index(split)) << 32) + index


def sample_scene(
    split: str, scene_seed: int, image_size: int = 96, cache: GlyphCache | None = None
) -> dict[str, Any]:
    """The scene (background, objects) for a seed, drawn so that it belongs to `split`.

    Scenes are redrawn until a hash of their content, modulo the number of splits, equals
    the split's index: two splits can then never hold the same image, whatever the seeds.
    """
    rng = np.random.default_rng(scene_seed)
    target = _split_index(split)
    cache = {} if cache is None else cache
    while True:
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        objects = _sample_objects(rng, image_size, cache)
        digest = hashlib.sha256(_scene_key(background, objects).encode()).digest()
        if int.from_bytes(digest[:8], "big") % len(SPLITS) == target:
            for obj in objects:
                obj["area"] = int(object_mask(obj, image_size, cache).sum())
            return {"image_size": image_size, "background": background, "objects": objects}
