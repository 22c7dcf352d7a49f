"""The synthetic benchmark: determinism, answers re-derived from metadata, split disjointness,
vocabulary, per-image variation of the needed detail, dense patch targets."""

from __future__ import annotations

import hashlib
import io
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from data import (
    BACKGROUNDS,
    COLOURS,
    FAMILIES,
    FAMILY_LEVELS,
    GLYPHS,
    LEVELS,
    SHAPES,
    SIZE_CLASSES,
    derive_answer,
    make_split,
    object_mask,
    patch_targets,
    question_text,
    render_scene,
    sample_meta,
    tokenize_words,
    vocabulary,
)
from data.synthetic import (
    BACKGROUND_RGB,
    COLOUR_RGB,
    GLYPH_SIZES,
    MAX_GLYPHS,
    SHAPE_SIZES,
    SPLITS,
    quadrant_of,
)

N_IMAGES = 120


def _raw_rows(dataset):
    return dataset.cast_column("image", dataset.features["image"].__class__(decode=False))


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def splits():
    return {split: make_split(split, N_IMAGES, seed=0) for split in SPLITS}


@pytest.fixture(scope="module")
def test_rows(splits):
    return [(row, sample_meta(row)) for row in _raw_rows(splits["test"])]


def test_same_seed_same_samples_other_seed_other_samples(splits):
    again = make_split("test", N_IMAGES, seed=0)
    assert again["id"] == splits["test"]["id"]
    assert again["question"] == splits["test"]["question"]
    assert again["answers"] == splits["test"]["answers"]
    assert again["meta"] == splits["test"]["meta"]
    a = [r["image"]["bytes"] for r in _raw_rows(again)]
    b = [r["image"]["bytes"] for r in _raw_rows(splits["test"])]
    assert a == b
    other = make_split("test", N_IMAGES, seed=1)
    assert other["meta"] != splits["test"]["meta"]


def test_splits_share_no_image_and_no_scene_seed(splits):
    pixels, seeds = {}, {}
    for split, dataset in splits.items():
        rows = list(_raw_rows(dataset))
        pixels[split] = {
            hashlib.sha256(_pixels(r["image"]["bytes"]).tobytes()).hexdigest() for r in rows
        }
        seeds[split] = {sample_meta(r)["scene_seed"] for r in rows}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not pixels[a] & pixels[b], (a, b)
            assert not seeds[a] & seeds[b], (a, b)


def test_splits_stay_disjoint_across_base_seeds():
    train = make_split("train", 60, seed=3)
    test = make_split("test", 60, seed=4)
    keys = [
        {(m["background"], str(m["objects"])) for m in map(sample_meta, ds)} for ds in (train, test)
    ]
    assert not keys[0] & keys[1]


def test_every_answer_rederives_from_metadata(test_rows):
    for row, meta in test_rows:
        assert row["answers"] == [derive_answer(meta)], row["id"]
        assert row["question"] == question_text(meta["template"], meta["params"])
        assert meta["level"] == FAMILY_LEVELS[meta["family"]]


def test_images_rerender_exactly_from_metadata(test_rows):
    for row, meta in test_rows:
        rendered = np.asarray(render_scene(meta))
        assert np.array_equal(rendered, _pixels(row["image"]["bytes"])), row["id"]


def test_objects_are_visible_separate_and_inside_one_quadrant(test_rows):
    size_ranges = {"shape": SHAPE_SIZES, "glyph": GLYPH_SIZES}
    for row, meta in test_rows:
        if meta["question_index"]:
            continue
        image = _pixels(row["image"]["bytes"])
        size = meta["image_size"]
        occupied = np.zeros((size, size), dtype=int)
        painted = np.zeros((size, size), dtype=bool)  # incl. anti-aliased glyph edges
        for obj in meta["objects"]:
            mask = object_mask(obj, size)
            assert mask.sum() == obj["area"] > 0
            occupied += mask
            x0, y0, x1, y1 = obj["bbox"]
            painted[y0:y1, x0:x1] = True
            assert mask[y0:y1, x0:x1].sum() == mask.sum()
            assert quadrant_of(obj["bbox"], size) == obj["quadrant"] is not None
            lo, hi = size_ranges[obj["kind"]][obj["size_class"]]
            assert lo <= obj["size"] <= hi
            if obj["kind"] == "shape":
                assert (image[mask] == COLOUR_RGB[obj["colour"]]).all()
        assert occupied.max() <= 1, row["id"]
        assert (image[~painted] == BACKGROUND_RGB[meta["background"]]).all()


def test_background_is_the_most_common_pixel_colour(test_rows):
    for row, meta in test_rows:
        if meta["family"] != "background":
            continue
        colours, counts = np.unique(
            _pixels(row["image"]["bytes"]).reshape(-1, 3), axis=0, return_counts=True
        )
        assert tuple(colours[counts.argmax()]) == BACKGROUND_RGB[row["answers"][0]]


def test_ids_and_images_per_image_id(splits):
    dataset = splits["calib"]
    assert len(dataset) == 4 * N_IMAGES
    assert len(set(dataset["id"])) == len(dataset)
    groups = defaultdict(list)
    for row in _raw_rows(dataset):
        groups[sample_meta(row)["image_id"]].append(row)
    assert len(groups) == N_IMAGES
    for image_id, rows in groups.items():
        assert [r["id"] for r in rows] == [f"{image_id}-{q}" for q in range(4)]
        assert len({r["image"]["bytes"] for r in rows}) == 1
        assert len({sample_meta(r)["family"] for r in rows}) == 4


def test_all_families_and_levels_occur_with_balanced_yes_no(splits):
    metas = [sample_meta(r) for ds in splits.values() for r in ds.select_columns(["meta"])]
    families = Counter(m["family"] for m in metas)
    assert set(families) == set(FAMILIES)
    assert {m["level"] for m in metas} == set(LEVELS)
    for family in (f for f in FAMILIES if f.startswith("yesno")):
        answers = [derive_answer(m) for m in metas if m["family"] == family]
        assert 0.3 < answers.count("yes") / len(answers) < 0.7, family


def test_needed_detail_varies_per_image_within_a_family(splits):
    metas = [sample_meta(r) for ds in splits.values() for r in ds.select_columns(["meta"])]
    for family in ("count", "count_quadrant", "quadrant", "digit", "yesno_fine"):
        details = Counter(m["detail"] for m in metas if m["family"] == family)
        assert details["small"] >= 0.2 * sum(details.values()), (family, details)
        assert details["small"] <= 0.8 * sum(details.values()), (family, details)
    global_details = Counter(m["detail"] for m in metas if m["level"] == "global")
    assert global_details["large"] >= 0.9 * sum(global_details.values())


def test_fine_questions_need_the_place_not_only_the_content(splits):
    """A fine "no" names a digit or value the image does show, only elsewhere: a pooled
    token that knows what is present but not where cannot tell it from "yes"."""
    metas = [sample_meta(r) for ds in splits.values() for r in ds.select_columns(["meta"])]
    hard = total = 0
    for meta in metas:
        digits = [o["glyph"] for o in meta["objects"] if o["kind"] == "glyph"]
        assert len(digits) == len(set(digits)) <= MAX_GLYPHS
        if meta["family"] == "digit":
            (glyph,) = [o for o in meta["objects"] if o["glyph"] == meta["params"]["digit"]]
            assert derive_answer(meta) == glyph["quadrant"]
        if meta["family"] != "yesno_fine" or derive_answer(meta) == "yes":
            continue
        params = meta["params"]
        if meta["template"] == "yn_digit":
            assert params["digit"] in digits
            continue
        key = "colour" if meta["template"] == "yn_position_colour" else "shape"
        values = {o[key] for o in meta["objects"] if o["kind"] == "shape"}
        total += len(values) > 1
        hard += len(values) > 1 and params[key] in values
    assert hard == total > 0


def test_quadrant_counts_are_not_given_away_by_the_whole_image_count(splits):
    """A quadrant count asks about a colour or kind the image shows, and the same whole-image
    count comes with different answers: a pooled token that keeps how many, not where, has to
    guess."""
    metas = [sample_meta(r) for ds in splits.values() for r in ds.select_columns(["meta"])]
    answers_by_total = defaultdict(set)
    for meta in (m for m in metas if m["family"] == "count_quadrant"):
        params = meta["params"]
        key = "colour" if meta["template"] == "count_quadrant_colour" else "shape"
        matching = [o for o in meta["objects"] if o["kind"] == "shape" and o[key] == params[key]]
        assert matching, meta["template"]
        inside = sum(o["quadrant"] == params["quadrant"] for o in matching)
        assert derive_answer(meta) == str(inside)
        answers_by_total[len(matching)].add(str(inside))
    assert answers_by_total[1] == {"0", "1"}
    assert len(answers_by_total[2]) >= 2


def test_questions_and_answers_tokenise_into_the_vocabulary(splits):
    vocab = vocabulary()
    assert vocab == sorted(set(vocab))
    assert all(w == w.lower() and " " not in w for w in vocab)
    assert tokenize_words("What colour is the Background?") == [
        "what",
        "colour",
        "is",
        "the",
        "background",
        "?",
    ]
    known = set(vocab)
    for dataset in splits.values():
        for question, answers in zip(dataset["question"], dataset["answers"], strict=True):
            assert set(tokenize_words(question)) <= known, question
            assert all(set(tokenize_words(a)) <= known for a in answers), answers


def test_questions_per_image_and_family_weights():
    two = make_split("train", 10, seed=0, questions_per_image=2)
    assert len(two) == 20
    only = make_split("train", 20, seed=0, family_weights={"background": 1.0, "digit": 1.0})
    families = Counter(sample_meta(r)["family"] for r in only.select_columns(["meta"]))
    assert set(families) <= {"background", "digit"}
    assert families["background"] == 20
    with pytest.raises(ValueError):
        make_split("train", 1, seed=0, family_weights={"colour_of_sky": 1.0})
    with pytest.raises(ValueError):
        make_split("valid", 1, seed=0)


def test_patch_targets_follow_the_objects(test_rows):
    for _, meta in test_rows[::4]:
        targets = patch_targets(meta)
        for key in ("colour", "shape", "glyph", "size", "centre"):
            assert targets[key].shape == (12, 12) and targets[key].dtype == np.int64
        assert int(targets["background"]) == BACKGROUNDS.index(meta["background"])
        assert targets["centre"].sum() == len(meta["objects"])
        assigned = targets["shape"] > 0
        assert ((targets["colour"] > 0) == assigned).all()
        assert ((targets["size"] > 0) == assigned).all()
        assert ((targets["glyph"] > 0) == (targets["shape"] == SHAPES.index("glyph"))).all()
        for obj in meta["objects"]:
            r, c = int(obj["cy"] // 8), int(obj["cx"] // 8)
            assert targets["colour"][r, c] == COLOURS.index(obj["colour"])
            assert targets["shape"][r, c] == SHAPES.index(obj["shape"])
            assert targets["size"][r, c] == SIZE_CLASSES.index(obj["size_class"])
            assert targets["glyph"][r, c] == (GLYPHS.index(obj["glyph"]) if obj["glyph"] else 0)


def test_patch_targets_leave_empty_patches_empty():
    meta = {
        "image_size": 96,
        "background": "gray",
        "objects": [
            {
                "kind": "shape",
                "shape": "square",
                "colour": "red",
                "size": 16,
                "size_class": "medium",
                "cx": 12.0,
                "cy": 12.0,
                "bbox": [4, 4, 20, 20],
                "glyph": None,
            }
        ],
    }
    targets = patch_targets(meta)
    expected = np.zeros((12, 12), dtype=bool)
    expected[0:3, 0:3] = True  # the square covers patches 0..2 (pixels 4..19), each >= 25 %
    assert ((targets["colour"] > 0) == expected).all()
    assert targets["centre"][1, 1] == 1 and targets["centre"].sum() == 1
    assert int(targets["background"]) == BACKGROUNDS.index("gray")
    with pytest.raises(ValueError):
        patch_targets(meta, grid=7)
