"""The questions: templates and their families, the benchmark's words, and the proposals
that pick, per image, a question of each family its scene can answer.

Proposals lean towards what makes the benchmark discriminative: fine questions about small
objects, counts spread over 0..MAX_SHAPES, and "no" answers that are hard negatives.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data.synthetic.answers import Scene, answer_and_relevant
from data.synthetic.scenes import (
    BACKGROUNDS,
    DIGITS,
    MAX_SHAPES,
    OBJECT_COLOURS,
    OBJECT_SHAPES,
    QUADRANTS,
)

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


def _count_params(rng: np.random.Generator, scene: Scene, prefix: str) -> Proposal:
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


def _propose_count_quadrant(rng: np.random.Generator, scene: Scene) -> Proposal | None:
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


def _pick_small(rng: np.random.Generator, scene: Scene, indices: Sequence[int]) -> int:
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


def _propose_quadrant(rng: np.random.Generator, scene: Scene) -> Proposal | None:
    obj = scene.objects
    unique = [
        i for i in scene.shapes() if len(scene.matching(obj[i]["colour"], obj[i]["shape"])) == 1
    ]
    if not unique:
        return None
    i = _pick(rng, unique)
    return "quadrant", {"colour": obj[i]["colour"], "shape": obj[i]["shape"]}


def _propose_yesno_global(rng: np.random.Generator, scene: Scene, say_yes: bool) -> Proposal:
    dom = scene.dominant()
    if dom is not None and rng.random() < 0.5:
        present = [o["colour"] for o in scene.objects]
        return "yn_dominant", {
            "colour": _yes_or_other(rng, say_yes, dom[0], OBJECT_COLOURS, present)
        }
    return "yn_background", {
        "background": _yes_or_other(rng, say_yes, scene.background, BACKGROUNDS)
    }


def _propose_yesno_coarse(rng: np.random.Generator, scene: Scene, say_yes: bool) -> Proposal | None:
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
        if answer_and_relevant(scene, template, params)[0] == "no":
            return template, params
    return None


def _propose_yesno_count(rng: np.random.Generator, scene: Scene, say_yes: bool) -> Proposal:
    template, params = _count_params(rng, scene, "yn_")
    actual = str(scene.count(params))
    near = [str(m) for m in (int(actual) - 1, int(actual) + 1) if 0 <= m <= MAX_SHAPES]
    return template, {**params, "n": _yes_or_other(rng, say_yes, actual, COUNTS, near)}


def _propose_yesno_fine(rng: np.random.Generator, scene: Scene, say_yes: bool) -> Proposal | None:
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


def propose(rng: np.random.Generator, scene: Scene, family: str) -> Proposal | None:
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


def choose_families(
    rng: np.random.Generator, available: Sequence[str], k: int, weights: Mapping[str, float]
) -> list[str]:
    """Weighted sampling without replacement (Efraimidis-Spirakis keys u ** (1 / w))."""
    keep = [f for f in available if weights.get(f, 0.0) > 0]
    if not keep:
        return []
    w = np.array([float(weights[f]) for f in keep])
    keys = rng.random(len(keep)) ** (1.0 / w)
    return [keep[int(i)] for i in np.argsort(-keys, kind="stable")[:k]]
