"""A seeded, procedural VQA benchmark whose questions need different amounts of visual detail.

Scenes are a background plus a few non-overlapping objects (flat-colour shapes and up to
three distinct digits drawn with Pillow's built-in font). Every object lies wholly inside one
image quadrant, so positional questions have one answer. Sizes vary per image: the same family
of question is answerable from a few pooled tokens when its objects are large and needs the
full token grid when they are a few pixels wide. That per-image variation is what a router
has to see in the image rather than read off the question.

Everything an answer depends on (background, objects with geometry, question template and
parameters) is in the sample's `meta`, so `render_scene` and `derive_answer` reproduce the
image and the gold answer exactly. `meta` is for analysis and tests; it is not a router input.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data.schema import SAMPLE_FEATURES, encode_meta

SPLITS: tuple[str, ...] = ("train", "calib", "test")

OBJECT_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
OBJECT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIGITS: tuple[str, ...] = tuple("0123456789")
BACKGROUNDS: tuple[str, ...] = ("black", "white", "gray", "cyan")
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")

# Class-name lists of the dense patch targets; index 0 is "no object" where there is one.
COLOURS: tuple[str, ...] = ("none", *OBJECT_COLOURS)
SHAPES: tuple[str, ...] = ("none", *OBJECT_SHAPES, "glyph")
GLYPHS: tuple[str, ...] = ("none", *DIGITS)
SIZE_CLASSES: tuple[str, ...] = ("none", "small", "medium", "large")

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

# Sizes in px at the reference 96 px image (scaled for other sizes). Shapes: side or
# diameter; glyphs: font size. STACK.md: 6-10 px shapes and 11-16 px digits are learnable
# by the tiny model at 144 tokens; "large" ones survive heavy pooling.
REFERENCE_SIZE = 96
SHAPE_SIZES: dict[str, tuple[int, int]] = {"small": (6, 10), "medium": (13, 20), "large": (24, 40)}
GLYPH_SIZES: dict[str, tuple[int, int]] = {"small": (11, 16), "medium": (18, 24), "large": (28, 40)}
EDGE_MARGIN = 2  # px between an object and its quadrant's borders
OBJECT_GAP = 3  # px between any two objects

DOMINANCE_RATIO = 3.0  # dominant colour: >= 3x the object area of any other colour
DOMINANT_MIN_FRACTION = 0.05  # ... and >= 5 % of the image, so the image mean shows it
LARGEST_RATIO = 1.5  # largest shape: >= 1.5x the area of the runner-up

LEVELS: tuple[str, ...] = ("global", "coarse", "count", "fine")
FAMILY_LEVELS: dict[str, str] = {
    "background": "global",
    "dominant_colour": "global",
    "largest_colour": "coarse",
    "largest_shape": "coarse",
    "quadrant": "coarse",
    "count": "count",
    "count_quadrant": "count",
    "digit": "fine",
    "yesno_global": "global",
    "yesno_coarse": "coarse",
    "yesno_count": "count",
    "yesno_fine": "fine",
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_LEVELS)
DEFAULT_FAMILY_WEIGHTS: dict[str, float] = {  # relative; among the families answerable
    "background": 1.0,
    "dominant_colour": 2.0,  # answerable on fewer scenes (needs one clearly dominant colour)
    "largest_colour": 1.0,
    "largest_shape": 1.0,
    "quadrant": 1.5,
    "count": 2.0,
    "count_quadrant": 2.0,
    "digit": 2.5,
    "yesno_global": 0.5,
    "yesno_coarse": 1.0,
    "yesno_count": 1.0,
    "yesno_fine": 2.0,
}

# template id -> (family, question text with {parameter} slots)
TEMPLATES: dict[str, tuple[str, str]] = {
    "background": ("background", "what colour is the background?"),
    "dominant_colour": ("dominant_colour", "which colour covers the most object area?"),
    "largest_colour": ("largest_colour", "what colour is the largest shape?"),
    "largest_shape": ("largest_shape", "what is the largest shape?"),
    "quadrant": ("quadrant", "where is the {colour} {shape}?"),
    "count_all": ("count", "how many shapes are there?"),
    "count_colour": ("count", "how many {colour} shapes are there?"),
    "count_shape": ("count", "how many {shape}s are there?"),
    "count_quadrant_colour": ("count_quadrant", "how many {colour} shapes are in the {quadrant}?"),
    "count_quadrant_shape": ("count_quadrant", "how many {shape}s are in the {quadrant}?"),
    "digit": ("digit", "where is the {digit}?"),
    "yn_background": ("yesno_global", "is the background {background}?"),
    "yn_dominant": ("yesno_global", "does {colour} cover the most object area?"),
    "yn_largest_colour": ("yesno_coarse", "is the largest shape {colour}?"),
    "yn_largest_shape": ("yesno_coarse", "is the largest shape a {shape}?"),
    "yn_present": ("yesno_coarse", "is there a {colour} {shape} in the {quadrant}?"),
    "yn_count_all": ("yesno_count", "is the number of shapes {n}?"),
    "yn_count_colour": ("yesno_count", "is the number of {colour} shapes {n}?"),
    "yn_count_shape": ("yesno_count", "is the number of {shape}s {n}?"),
    "yn_position_shape": ("yesno_fine", "is the shape in the {quadrant} a {shape}?"),
    "yn_position_colour": ("yesno_fine", "is the shape in the {quadrant} {colour}?"),
    "yn_digit": ("yesno_fine", "is there a {digit} in the {quadrant}?"),
}
MAX_SHAPES = 5
MAX_GLYPHS = 3
COUNTS: tuple[str, ...] = tuple(str(n) for n in range(MAX_SHAPES + 1))
_PARAM_VALUES: dict[str, tuple[str, ...]] = {
    "colour": OBJECT_COLOURS,
    "shape": OBJECT_SHAPES,
    "quadrant": QUADRANTS,
    "background": BACKGROUNDS,
    "digit": DIGITS,
    "n": COUNTS,
}

_WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def tokenize_words(text: str) -> list[str]:
    """The word-level tokenisation rule of the benchmark (and of the tiny model's tokenizer).

    Lower-case, then take maximal runs of [a-z0-9] as words and every other non-space
    character (e.g. "?") as a token of its own: "What colour?" -> ["what", "colour", "?"].
    """
    return _WORD_RE.findall(text.lower())


def vocabulary() -> list[str]:
    """Every token that can occur in a benchmark question or answer, sorted."""
    words: set[str] = {"yes", "no"}
    for _, text in TEMPLATES.values():
        words.update(tokenize_words(re.sub(r"\{\w+\}s?", " ", text)))
    for values in _PARAM_VALUES.values():
        for value in values:
            words.update(tokenize_words(value))
    words.update(f"{shape}s" for shape in OBJECT_SHAPES)
    return sorted(words)


def question_text(template: str, params: Mapping[str, Any]) -> str:
    """The question for a template and its parameters."""
    return TEMPLATES[template][1].format(**params)


# ---------------------------------------------------------------- geometry and rendering


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


GlyphCache = dict[tuple[str, int], Image.Image]


def _glyph_ink(char: str, font_size: int, cache: GlyphCache | None = None) -> Image.Image:
    """The anti-aliased ink of one character, cropped to its bounding box (mode L).

    Font rendering dominates generation time; callers that render many scenes pass a
    `cache` dict they own (its images are never modified).
    """
    if cache is not None:
        if (char, font_size) not in cache:
            cache[char, font_size] = _glyph_ink(char, font_size)
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
        canvas.paste(_glyph_ink(obj["glyph"], obj["size"], cache), (x0, y0))
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


# ---------------------------------------------------------------- scene sampling


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
            width, height = _glyph_ink(glyph, size, cache).size
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


# ---------------------------------------------------------------- answers from metadata


@dataclass
class _Scene:
    """A scene's objects with their rendered areas, for answering questions about it."""

    image_size: int
    background: str
    objects: list[dict[str, Any]]
    areas: list[int]

    quadrants: list[str | None]

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], cache: GlyphCache | None = None) -> _Scene:
        """Areas and quadrants are recomputed from the geometry, not read from meta."""
        size = int(meta["image_size"])
        objects = [dict(o) for o in meta["objects"]]
        areas = [int(object_mask(o, size, cache).sum()) for o in objects]
        quadrants = [quadrant_of(o["bbox"], size) for o in objects]
        return cls(size, meta["background"], objects, areas, quadrants)

    def quadrant(self, i: int) -> str | None:
        return self.quadrants[i]

    def shapes(self) -> list[int]:
        return [i for i, o in enumerate(self.objects) if o["kind"] == "shape"]

    def glyphs(self) -> list[int]:
        return [i for i, o in enumerate(self.objects) if o["kind"] == "glyph"]

    def dominant(self) -> tuple[str, int] | None:
        """(colour, its largest object) when one colour has >= 3x any other's object area
        and covers >= 5 % of the image."""
        totals: dict[str, int] = {}
        for o, a in zip(self.objects, self.areas, strict=True):
            totals[o["colour"]] = totals.get(o["colour"], 0) + a
        if not totals:
            return None
        ranked = sorted(totals.values(), reverse=True)
        if len(ranked) > 1 and ranked[0] < DOMINANCE_RATIO * ranked[1]:
            return None
        if ranked[0] < DOMINANT_MIN_FRACTION * self.image_size**2:
            return None
        colour = max(totals, key=totals.__getitem__)
        members = [i for i, o in enumerate(self.objects) if o["colour"] == colour]
        return colour, max(members, key=self.areas.__getitem__)

    def largest(self) -> int | None:
        """The largest shape when it has >= 1.5x the area of the runner-up."""
        ranked = sorted(self.shapes(), key=lambda i: -self.areas[i])
        if not ranked:
            return None
        if len(ranked) > 1 and self.areas[ranked[0]] < LARGEST_RATIO * self.areas[ranked[1]]:
            return None
        return ranked[0]

    def matching(self, colour: str | None = None, shape: str | None = None) -> list[int]:
        return [
            i
            for i in self.shapes()
            if (colour is None or self.objects[i]["colour"] == colour)
            and (shape is None or self.objects[i]["shape"] == shape)
        ]

    def in_quadrant(self, quadrant: str) -> list[int]:
        return [i for i, q in enumerate(self.quadrants) if q == quadrant]

    def lone_shape(self, quadrant: str) -> int | None:
        """The shape in a quadrant that holds exactly one object, that object a shape."""
        members = [i for i, q in enumerate(self.quadrants) if q == quadrant]
        if len(members) == 1 and self.objects[members[0]]["kind"] == "shape":
            return members[0]
        return None

    def glyph(self, digit: str) -> int | None:
        """The glyph showing `digit` (a scene's digits are distinct), else None."""
        found = [i for i in self.glyphs() if self.objects[i]["glyph"] == digit]
        return found[0] if found else None

    def count(self, params: Mapping[str, Any]) -> int:
        """The shapes matching the optional `colour`, `shape` and `quadrant` parameters (any
        other parameter, such as a yes/no question's `n`, is not a filter)."""
        found = self.matching(params.get("colour"), params.get("shape"))
        if "quadrant" in params:
            found = [i for i in found if self.quadrants[i] == params["quadrant"]]
        return len(found)


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _answer_and_relevant(
    scene: _Scene, template: str, params: Mapping[str, Any]
) -> tuple[str, list[int]] | None:
    """The gold answer and the objects it depends on, or None if the question is ambiguous."""
    obj = scene.objects
    if template == "background":
        return scene.background, []
    if template == "yn_background":
        return _yes_no(scene.background == params["background"]), []
    if template in ("dominant_colour", "yn_dominant"):
        dom = scene.dominant()
        if dom is None:
            return None
        colour, member = dom
        if template == "dominant_colour":
            return colour, [member]
        return _yes_no(colour == params["colour"]), [member]
    if template in ("largest_colour", "largest_shape", "yn_largest_colour", "yn_largest_shape"):
        i = scene.largest()
        if i is None:
            return None
        if template == "largest_colour":
            return obj[i]["colour"], [i]
        if template == "largest_shape":
            return obj[i]["shape"], [i]
        key = "colour" if template == "yn_largest_colour" else "shape"
        return _yes_no(obj[i][key] == params[key]), [i]
    if template == "quadrant":
        found = scene.matching(params["colour"], params["shape"])
        if len(found) != 1 or scene.quadrant(found[0]) is None:
            return None
        return str(scene.quadrant(found[0])), found
    if template == "yn_present":
        q = params["quadrant"]
        hits = [
            i for i in scene.matching(params["colour"], params["shape"]) if scene.quadrant(i) == q
        ]
        return _yes_no(bool(hits)), hits or scene.in_quadrant(q)
    if template in ("count_all", "count_colour", "count_shape"):
        return str(scene.count(params)), scene.shapes()
    if template in ("yn_count_all", "yn_count_colour", "yn_count_shape"):
        return _yes_no(scene.count(params) == int(params["n"])), scene.shapes()
    if template in ("count_quadrant_colour", "count_quadrant_shape"):
        return str(scene.count(params)), scene.matching(params.get("colour"), params.get("shape"))
    if template in ("yn_position_shape", "yn_position_colour"):
        i = scene.lone_shape(params["quadrant"])
        if i is None:
            return None
        key = "shape" if template == "yn_position_shape" else "colour"
        return _yes_no(obj[i][key] == params[key]), [i]
    if template == "digit":
        i = scene.glyph(params["digit"])
        if i is None or scene.quadrant(i) is None:
            return None
        return str(scene.quadrant(i)), [i]
    if template == "yn_digit":
        i = scene.glyph(params["digit"])
        q = params["quadrant"]
        if i is None:
            return "no", scene.in_quadrant(q)
        return _yes_no(scene.quadrant(i) == q), [i]
    raise ValueError(f"unknown template {template!r}")


def _detail(scene: _Scene, relevant: Sequence[int]) -> str:
    """The finest size class among the objects an answer depends on ("large" if none)."""
    classes = [scene.objects[i]["size_class"] for i in relevant]
    for name in ("small", "medium"):
        if name in classes:
            return name
    return "large"


def derive_answer(meta: Mapping[str, Any]) -> str:
    """Re-derive the gold answer from a sample's metadata (scene plus question parameters)."""
    found = _answer_and_relevant(_Scene.from_meta(meta), meta["template"], meta["params"])
    if found is None:
        raise ValueError(f"question {meta['template']!r} has no unambiguous answer here")
    return found[0]


# ---------------------------------------------------------------- question sampling


Proposal = tuple[str, dict[str, Any]]  # (template id, its parameters)


def _pick(rng: np.random.Generator, values: Sequence[Any]) -> Any:
    return values[int(rng.integers(len(values)))]


def _other(
    rng: np.random.Generator,
    values: Sequence[str],
    exclude: str,
    prefer: Sequence[str] = (),
    hard_rate: float = 0.5,
) -> str:
    """A value other than `exclude`; with probability `hard_rate` one from `prefer` (a hard
    negative), when `prefer` has one."""
    hard = [v for v in dict.fromkeys(prefer) if v != exclude]
    if hard and rng.random() < hard_rate:
        return _pick(rng, hard)
    return _pick(rng, [v for v in values if v != exclude])


def _count_params(rng: np.random.Generator, scene: _Scene, prefix: str) -> Proposal:
    """A counting question whose answer is near a uniformly drawn target in 0..MAX_SHAPES,
    so that answers are not dominated by small counts."""
    candidates = (
        [("count_all", {})]
        + [("count_colour", {"colour": c}) for c in OBJECT_COLOURS]
        + [("count_shape", {"shape": s}) for s in OBJECT_SHAPES]
    )
    by_count: dict[int, list[tuple[str, dict]]] = {}
    for template, params in candidates:
        by_count.setdefault(scene.count(params), []).append((template, params))
    target = int(rng.integers(MAX_SHAPES + 1))
    n = min(by_count, key=lambda m: (abs(m - target), m))
    template, params = _pick(rng, by_count[n])
    return prefix + template, params


FINE_SIZE_WEIGHTS = {"small": 3.0, "medium": 1.5, "large": 1.0}


def _propose_count_quadrant(rng: np.random.Generator, scene: _Scene) -> Proposal | None:
    """How many shapes of a colour or kind lie in one quadrant, about a colour or kind the
    image shows (more often one it shows several times). The answer is drawn uniformly among
    the counts the quadrants offer, so that knowing how many there are in the whole image
    (what one pooled token keeps) leaves it a guess."""
    totals = {
        (template, key, value): scene.count({key: value})
        for template, key, values in (
            ("count_quadrant_colour", "colour", OBJECT_COLOURS),
            ("count_quadrant_shape", "shape", OBJECT_SHAPES),
        )
        for value in values
    }
    present = [k for k, n in totals.items() if n]
    if not present:
        return None
    w = np.array([totals[k] for k in present], dtype=float)
    template, key, value = present[int(rng.choice(len(present), p=w / w.sum()))]
    params = {key: value}
    by_count: dict[int, list[str]] = {}
    for q in QUADRANTS:
        by_count.setdefault(scene.count({**params, "quadrant": q}), []).append(q)
    quadrant = _pick(rng, by_count[_pick(rng, sorted(by_count))])
    return template, {**params, "quadrant": quadrant}


def _pick_small(rng: np.random.Generator, scene: _Scene, indices: Sequence[int]) -> int:
    """One of the objects `indices`, small ones favoured, so that fine questions are mostly
    about small objects (large shapes are more often alone in their quadrant: they fill it)."""
    w = np.array([FINE_SIZE_WEIGHTS[scene.objects[i]["size_class"]] for i in indices])
    return indices[int(rng.choice(len(indices), p=w / w.sum()))]


def _yes_or_other(
    rng: np.random.Generator,
    say_yes: bool,
    true: str,
    values: Sequence[str],
    prefer: Sequence[str] = (),
    hard_rate: float = 0.5,
) -> str:
    """The true value for a "yes" question, a (preferably hard) wrong one for a "no"."""
    return true if say_yes else _other(rng, values, true, prefer, hard_rate)


def _propose_quadrant(rng: np.random.Generator, scene: _Scene) -> Proposal | None:
    obj = scene.objects
    unique = [
        i for i in scene.shapes() if len(scene.matching(obj[i]["colour"], obj[i]["shape"])) == 1
    ]
    if not unique:
        return None
    i = _pick(rng, unique)
    return "quadrant", {"colour": obj[i]["colour"], "shape": obj[i]["shape"]}


def _propose_yesno_global(rng: np.random.Generator, scene: _Scene, say_yes: bool) -> Proposal:
    dom = scene.dominant()
    if dom is not None and rng.random() < 0.5:
        present = [o["colour"] for o in scene.objects]
        return "yn_dominant", {
            "colour": _yes_or_other(rng, say_yes, dom[0], OBJECT_COLOURS, present)
        }
    return "yn_background", {
        "background": _yes_or_other(rng, say_yes, scene.background, BACKGROUNDS)
    }


def _propose_yesno_coarse(
    rng: np.random.Generator, scene: _Scene, say_yes: bool
) -> Proposal | None:
    obj = scene.objects
    shapes = scene.shapes()
    if not shapes:
        return None
    largest = scene.largest()
    options = ["yn_present"]
    if largest is not None:
        options += ["yn_largest_colour", "yn_largest_shape"]
    template = _pick(rng, options)
    if template != "yn_present":
        key, values = (
            ("colour", OBJECT_COLOURS)
            if template == "yn_largest_colour"
            else ("shape", OBJECT_SHAPES)
        )
        present = [obj[i][key] for i in shapes]
        return template, {key: _yes_or_other(rng, say_yes, obj[largest][key], values, present)}
    if say_yes:
        i = _pick(rng, shapes)
        return template, {
            "colour": obj[i]["colour"],
            "shape": obj[i]["shape"],
            "quadrant": scene.quadrant(i),
        }
    for _ in range(20):  # half the time an object that exists, asked about another quadrant
        if rng.random() < 0.5:
            i = _pick(rng, shapes)
            colour, shape = obj[i]["colour"], obj[i]["shape"]
        else:
            colour, shape = _pick(rng, OBJECT_COLOURS), _pick(rng, OBJECT_SHAPES)
        params = {"colour": colour, "shape": shape, "quadrant": _pick(rng, QUADRANTS)}
        if _answer_and_relevant(scene, template, params)[0] == "no":
            return template, params
    return None


def _propose_yesno_count(rng: np.random.Generator, scene: _Scene, say_yes: bool) -> Proposal:
    template, params = _count_params(rng, scene, "yn_")
    actual = str(scene.count(params))
    near = [str(m) for m in (int(actual) - 1, int(actual) + 1) if 0 <= m <= MAX_SHAPES]
    return template, {**params, "n": _yes_or_other(rng, say_yes, actual, COUNTS, near)}


def _propose_yesno_fine(rng: np.random.Generator, scene: _Scene, say_yes: bool) -> Proposal | None:
    """Fine yes/no questions whose "no" is always hard where the scene allows: the value is
    present elsewhere, so only the object at the asked place can tell yes from no."""
    obj = scene.objects
    lone = [i for i in (scene.lone_shape(q) for q in QUADRANTS) if i is not None]
    glyphs = scene.glyphs()
    options = (["yn_position_shape", "yn_position_colour"] if lone else []) + (
        ["yn_digit"] if glyphs else []
    )
    if not options:
        return None
    template = _pick(rng, options)
    if template == "yn_digit":
        i = _pick_small(rng, scene, glyphs)
        q = scene.quadrant(i)
        return template, {
            "digit": obj[i]["glyph"],
            "quadrant": _yes_or_other(rng, say_yes, q, QUADRANTS),
        }
    i = _pick_small(rng, scene, lone)
    key, values = (
        ("shape", OBJECT_SHAPES) if template == "yn_position_shape" else ("colour", OBJECT_COLOURS)
    )
    present = [obj[j][key] for j in scene.shapes()]
    value = _yes_or_other(rng, say_yes, obj[i][key], values, present, hard_rate=1.0)
    return template, {"quadrant": scene.quadrant(i), key: value}


def _propose(rng: np.random.Generator, scene: _Scene, family: str) -> Proposal | None:
    """A (template, params) of `family` answerable on this scene, or None. Yes/no families
    answer "yes" half of the time."""
    say_yes = rng.random() < 0.5
    if family == "background":
        return "background", {}
    if family == "dominant_colour":
        return ("dominant_colour", {}) if scene.dominant() else None
    if family in ("largest_colour", "largest_shape"):
        return (family, {}) if scene.largest() is not None else None
    if family == "quadrant":
        return _propose_quadrant(rng, scene)
    if family == "count":
        return _count_params(rng, scene, "")
    if family == "count_quadrant":
        return _propose_count_quadrant(rng, scene)
    if family == "digit":
        glyphs = scene.glyphs()
        if not glyphs:
            return None
        return "digit", {"digit": scene.objects[_pick_small(rng, scene, glyphs)]["glyph"]}
    if family == "yesno_global":
        return _propose_yesno_global(rng, scene, say_yes)
    if family == "yesno_coarse":
        return _propose_yesno_coarse(rng, scene, say_yes)
    if family == "yesno_count":
        return _propose_yesno_count(rng, scene, say_yes)
    if family == "yesno_fine":
        return _propose_yesno_fine(rng, scene, say_yes)
    raise ValueError(f"unknown family {family!r}")


def _choose_families(
    rng: np.random.Generator, available: Sequence[str], k: int, weights: Mapping[str, float]
) -> list[str]:
    """Weighted sampling without replacement (Efraimidis-Spirakis keys u ** (1 / w))."""
    keep = [f for f in available if weights.get(f, 0.0) > 0]
    if not keep:
        return []
    w = np.array([float(weights[f]) for f in keep])
    keys = rng.random(len(keep)) ** (1.0 / w)
    return [keep[int(i)] for i in np.argsort(-keys, kind="stable")[:k]]


def make_split(
    split: str,
    n_images: int,
    seed: int,
    *,
    image_size: int = 96,
    questions_per_image: int = 4,
    family_weights: Mapping[str, float] | None = None,
) -> datasets.Dataset:
    """`n_images` scenes of one split with up to `questions_per_image` questions each.

    The questions of an image come from distinct families, drawn with `family_weights`
    (default DEFAULT_FAMILY_WEIGHTS; 0 disables a family) among those answerable on it.
    Rows of one image are adjacent and share `meta.image_id` and the image bytes.
    """
    weights = dict(DEFAULT_FAMILY_WEIGHTS if family_weights is None else family_weights)
    unknown = set(weights) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families in family_weights: {sorted(unknown)}")
    rows = []
    cache: GlyphCache = {}
    for index in range(n_images):
        seed_value = split_scene_seed(split, index, seed)
        scene_meta = sample_scene(split, seed_value, image_size, cache)
        objects = scene_meta["objects"]
        scene = _Scene(
            image_size,
            scene_meta["background"],
            objects,
            [o["area"] for o in objects],
            [o["quadrant"] for o in objects],
        )
        rng = np.random.default_rng([seed_value, 1])
        proposals = {f: _propose(rng, scene, f) for f in FAMILIES}
        available = [f for f, p in proposals.items() if p is not None]
        image_id = f"{split}-{index:06d}"
        png = {"bytes": encode_png(render_scene(scene_meta, cache)), "path": None}
        for q, family in enumerate(_choose_families(rng, available, questions_per_image, weights)):
            template, params = proposals[family]
            answer, relevant = _answer_and_relevant(scene, template, params)
            meta = {
                "split": split,
                "image_id": image_id,
                "scene_seed": seed_value,
                **scene_meta,
                "family": family,
                "level": FAMILY_LEVELS[family],
                "template": template,
                "params": params,
                "detail": _detail(scene, relevant),
                "question_index": q,
            }
            rows.append(
                {
                    "id": f"{image_id}-{q}",
                    "image": png,
                    "question": question_text(template, params),
                    "answers": [answer],
                    "meta": encode_meta(meta),
                }
            )
    return datasets.Dataset.from_list(rows, features=SAMPLE_FEATURES)


# ---------------------------------------------------------------- dense patch targets

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
