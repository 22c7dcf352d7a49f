"""Gold answers from a scene's metadata: which objects a question is about, its answer, or
None where the scene makes the question ambiguous (then it is never asked).

Areas are those of the rendered pixels, so "largest" and "dominant" mean what the image shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from data.synthetic.render import GlyphCache, object_mask
from data.synthetic.scenes import quadrant_of

DOMINANCE_RATIO = 3.0  # dominant colour: >= 3x the object area of any other colour
DOMINANT_MIN_FRACTION = 0.05  # ... and >= 5 % of the image, so the image mean shows it
LARGEST_RATIO = 1.5  # largest shape: >= 1.5x the area of the runner-up


@dataclass
class Scene:
    """A scene's objects with their rendered areas, for answering questions about it."""

    image_size: int
    background: str
    objects: list[dict[str, Any]]
    areas: list[int]

    quadrants: list[str | None]

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], cache: GlyphCache | None = None) -> Scene:
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


def answer_and_relevant(
    scene: Scene, template: str, params: Mapping[str, Any]
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


def needed_detail(scene: Scene, relevant: Sequence[int]) -> str:
    """The finest size class among the objects an answer depends on ("large" if none)."""
    classes = [scene.objects[i]["size_class"] for i in relevant]
    for name in ("small", "medium"):
        if name in classes:
            return name
    return "large"


def derive_answer(meta: Mapping[str, Any]) -> str:
    """Re-derive the gold answer from a sample's metadata (scene plus question parameters)."""
    found = answer_and_relevant(Scene.from_meta(meta), meta["template"], meta["params"])
    if found is None:
        raise ValueError(f"question {meta['template']!r} has no unambiguous answer here")
    return found[0]
