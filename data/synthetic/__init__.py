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

One module per job: `scenes` (sampling), `render` (pixels), `answers` (gold answers from
metadata), `questions` (templates, words, per-image proposals), `splits` (assembly into a
`datasets` split) and `patches` (the vision tower's per-patch pretraining targets).
"""

from data.synthetic.answers import derive_answer
from data.synthetic.patches import COLOURS, GLYPHS, SHAPES, SIZE_CLASSES, patch_targets
from data.synthetic.questions import (
    DEFAULT_FAMILY_WEIGHTS,
    FAMILIES,
    FAMILY_LEVELS,
    LEVELS,
    TEMPLATES,
    question_text,
    tokenize_words,
    vocabulary,
)
from data.synthetic.render import BACKGROUND_RGB, COLOUR_RGB, object_mask, render_scene
from data.synthetic.scenes import (
    BACKGROUNDS,
    DIGITS,
    GLYPH_SIZES,
    MAX_GLYPHS,
    MAX_SHAPES,
    OBJECT_COLOURS,
    OBJECT_SHAPES,
    QUADRANTS,
    SHAPE_SIZES,
    SPLITS,
    quadrant_of,
    sample_scene,
    split_scene_seed,
)
from data.synthetic.splits import make_split

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_RGB",
    "COLOURS",
    "COLOUR_RGB",
    "DEFAULT_FAMILY_WEIGHTS",
    "DIGITS",
    "FAMILIES",
    "FAMILY_LEVELS",
    "GLYPHS",
    "GLYPH_SIZES",
    "LEVELS",
    "MAX_GLYPHS",
    "MAX_SHAPES",
    "OBJECT_COLOURS",
    "OBJECT_SHAPES",
    "QUADRANTS",
    "SHAPES",
    "SHAPE_SIZES",
    "SIZE_CLASSES",
    "SPLITS",
    "TEMPLATES",
    "derive_answer",
    "make_split",
    "object_mask",
    "patch_targets",
    "quadrant_of",
    "question_text",
    "render_scene",
    "sample_scene",
    "split_scene_seed",
    "tokenize_words",
    "vocabulary",
]
