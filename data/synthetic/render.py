"""Drawing a scene from its metadata: the exact pixels every split, answer and patch target
is derived from. Pillow's built-in font draws the digits, so no font file is needed."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25),
    "green": (30, 170, 50),
    "blue": (30, 70, 235),
    "yellow": (245, 225, 35),
    "purple": (150, 50, 205),
    "orange": (255, 130, 0),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "cyan": (0, 190, 190),
}

GlyphCache = dict[tuple[str, int], Image.Image]


def glyph_ink(char: str, font_size: int, cache: GlyphCache | None = None) -> Image.Image:
    """The anti-aliased ink of one character, cropped to its bounding box (mode L).

    Font rendering dominates generation time; callers that render many scenes pass a
    `cache` dict they own (its images are never modified).
    """
    if cache is not None:
        if (char, font_size) not in cache:
            cache[char, font_size] = glyph_ink(char, font_size)
        return cache[char, font_size]
    font = ImageFont.load_default(size=font_size)
    side = 2 * font_size + 8
    canvas = Image.new("L", (side, side), 0)
    ImageDraw.Draw(canvas).text((4, 4), char, fill=255, font=font)
    box = canvas.getbbox()
    if box is None:
        raise ValueError(f"character {char!r} renders no ink at size {font_size}")
    return canvas.crop(box)


def _coverage(
    obj: Mapping[str, Any], image_size: int, cache: GlyphCache | None = None
) -> Image.Image:
    """Per-pixel coverage (0-255, mode L) of one object on an empty canvas."""
    canvas = Image.new("L", (image_size, image_size), 0)
    x0, y0, x1, y1 = obj["bbox"]
    if obj["kind"] == "glyph":
        canvas.paste(glyph_ink(obj["glyph"], obj["size"], cache), (x0, y0))
        return canvas
    draw = ImageDraw.Draw(canvas)
    shape = obj["shape"]
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return canvas


def object_mask(
    obj: Mapping[str, Any], image_size: int, cache: GlyphCache | None = None
) -> np.ndarray:
    """Boolean (H, W) mask of the pixels an object paints (glyph ink at >= 50 % coverage)."""
    return np.asarray(_coverage(obj, image_size, cache)) >= 128


def render_scene(meta: Mapping[str, Any], cache: GlyphCache | None = None) -> Image.Image:
    """Render the exact RGB image of a scene from its metadata."""
    size = int(meta["image_size"])
    image = Image.new("RGB", (size, size), BACKGROUND_RGB[meta["background"]])
    for obj in meta["objects"]:
        image.paste(COLOUR_RGB[obj["colour"]], (0, 0, size, size), _coverage(obj, size, cache))
    return image


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
