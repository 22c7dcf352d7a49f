"""Split assembly: scenes by seed, their questions and answers, into one `datasets` split."""

from __future__ import annotations

from collections.abc import Mapping

import datasets
import numpy as np
from tqdm.auto import tqdm

from data.schema import SAMPLE_FEATURES, encode_meta
from data.synthetic.answers import Scene, answer_and_relevant, needed_detail
from data.synthetic.questions import (
    DEFAULT_FAMILY_WEIGHTS,
    FAMILIES,
    FAMILY_LEVELS,
    choose_families,
    propose,
    question_text,
)
from data.synthetic.render import GlyphCache, encode_png, render_scene
from data.synthetic.scenes import sample_scene, split_scene_seed


def make_split(
    split: str,
    n_images: int,
    seed: int,
    *,
    image_size: int = 96,
    questions_per_image: int = 4,
    family_weights: Mapping[str, float] | None = None,
    progress: bool = False,
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
    for index in tqdm(range(n_images), desc=split, unit="image", disable=not progress):
        seed_value = split_scene_seed(split, index, seed)
        scene_meta = sample_scene(split, seed_value, image_size, cache)
        objects = scene_meta["objects"]
        scene = Scene(
            image_size,
            scene_meta["background"],
            objects,
            [o["area"] for o in objects],
            [o["quadrant"] for o in objects],
        )
        rng = np.random.default_rng([seed_value, 1])
        proposals = {f: propose(rng, scene, f) for f in FAMILIES}
        available = [f for f, p in proposals.items() if p is not None]
        image_id = f"{split}-{index:06d}"
        png = {"bytes": encode_png(render_scene(scene_meta, cache)), "path": None}
        for q, family in enumerate(choose_families(rng, available, questions_per_image, weights)):
            template, params = proposals[family]
            answer, relevant = answer_and_relevant(scene, template, params)
            meta = {
                "split": split,
                "image_id": image_id,
                "scene_seed": seed_value,
                **scene_meta,
                "family": family,
                "level": FAMILY_LEVELS[family],
                "template": template,
                "params": params,
                "detail": needed_detail(scene, relevant),
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
