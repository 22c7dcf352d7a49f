"""AdaptiveLMM on the micro model: routed scales reach the LLM, budgets move spending, errors."""

import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from m3core import MICRO, tiny_lmm
from m3core.features import feature_names, router_features
from pipelines.adaptive import AdaptiveLMM
from predictor import ScaleRouter, TuneResult, calibration_table, save_calibration
from tests.conftest import MICRO_WORDS

QUESTIONS = ("what colour is the left side ?", "what colour is the right side ?")


def samples(n: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    """Two-colour images with random colours, so router features vary continuously."""
    rng = random.Random(seed)
    images, questions = [], []
    for i in range(n):
        image = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (16, 0, 32, 32))
        images.append(image)
        questions.append(QUESTIONS[i % 2])
    return images, questions


def features(lmm, images, questions) -> np.ndarray:
    return router_features(lmm, lmm.encode(images), questions)


def rule_correct(X: np.ndarray, column: int, n_scales: int) -> np.ndarray:
    """Correct at scale j iff the sample's rank in one feature is below (j + 1) / S: a
    learnable oracle scale that differs between samples; the largest scale is always right."""
    rank = np.argsort(np.argsort(X[:, column])) / len(X)
    cuts = (np.arange(n_scales) + 1) / n_scales
    return rank[:, None] < cuts[None, :]


def count_image_tokens(lmm):
    """Per LLM prefill: the visual-token count of each image handed to the LLM."""
    seen: list[list[int]] = []

    def hook(module, args, kwargs):
        outputs, ids = kwargs.get("mm_encoder_outputs"), kwargs.get("input_ids")
        if outputs and ids is not None and bool((ids == lmm.image_token_id).any()):
            rows = [t.shape[0] for t in outputs["image"].pooler_output]
            assert int((ids == lmm.image_token_id).sum()) == sum(rows)
            seen.append(rows)

    return seen, lmm.model.model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A saved micro model, a calibrated router on its own features, an uncalibrated copy."""
    lmm = tiny_lmm(MICRO_WORDS, MICRO, seed=0)
    root = tmp_path_factory.mktemp("adaptive")
    lmm.save_pretrained(root / "model")
    names = feature_names(lmm)
    column = names.index("v1_0")
    S = len(lmm.scales)
    X_train = features(lmm, *samples(60, seed=1))
    router = ScaleRouter("logreg", scales=lmm.scales, policy="threshold", knob=0.5, C=10.0)
    router.fit(X_train, rule_correct(X_train, column, S), feature_names=names)
    router.save(root / "bare")
    router.save(root / "router")
    X_cal = features(lmm, *samples(60, seed=2))
    table = calibration_table(
        router.predict_proba(X_cal), rule_correct(X_cal, column, S), lmm.scales, None, "threshold"
    )
    save_calibration(table, root / "router")
    return root


@pytest.fixture(scope="module")
def adaptive(folders):
    return AdaptiveLMM.from_pretrained(folders / "model", folders / "router", device="cpu")


def test_routed_scales_reach_the_llm_grouped_one_scale_per_batch(adaptive):
    lmm = adaptive.lmm
    images, questions = samples(12, seed=3)
    expected = adaptive.router.route(features(lmm, images, questions)).tolist()
    assert len(set(expected)) > 1, "the rule should send samples to different scales"
    seen, handle = count_image_tokens(lmm)
    tokenized = []
    tokenize = lmm._prompt_ids
    lmm._prompt_ids = lambda qs: tokenized.append(len(qs)) or tokenize(qs)
    try:
        records = adaptive.generate(images, questions, max_new_tokens=3, batch_size=4)
    finally:
        handle.remove()
        del lmm._prompt_ids
    assert tokenized == [12]  # once, shared by the router features and every scale's batch
    assert [r.scale for r in records] == expected
    assert all(r.routed_by == "router" and r.tried_scales == [r.scale] for r in records)
    assert all(len(set(rows)) == 1 and len(rows) <= 4 for rows in seen)
    assert Counter(s for rows in seen for s in rows) == Counter(expected)
    assert [r.visual_tokens for r in records] == expected
    timing = adaptive.last_timing
    assert timing["route_s"] > 0 and timing["n"] == 12
    assert sum(r.route_seconds for r in records) == pytest.approx(timing["route_s"])
    assert 0 < timing["route_share"] < 1
    # grouping by scale changes no answer: each sample alone at its scale gives the same
    for i, record in enumerate(records):
        alone = lmm.generate([images[i]], [questions[i]], scale=record.scale, max_new_tokens=3)[0]
        assert (alone.token_ids, alone.text) == (record.token_ids, record.text)
        assert alone.confidence == pytest.approx(record.confidence, abs=1e-4)


def test_budget_moves_spending_both_ways(adaptive):
    images, questions = samples(16, seed=4)

    def mean_scale(budget):
        records = adaptive.generate(images, questions, budget=budget, max_new_tokens=2)
        return np.mean([r.scale for r in records])

    tight, loose = mean_scale("tokens<=2"), mean_scale("tokens<=12")
    assert tight < loose
    assert tight <= mean_scale(None) <= 16
    everything = TuneResult("threshold", 1.01, {}, {})  # above every probability
    assert mean_scale(everything) == adaptive.scales[-1]
    assert mean_scale(TuneResult("fixed", 4.0, {}, {})) == 4
    certified = adaptive.resolve_budget("loss<=0.3@0.2")
    assert certified.target["epsilon"] == 0.3


def test_budget_without_calibration_json_is_a_clear_error(folders):
    bare = AdaptiveLMM.from_pretrained(folders / "model", folders / "bare", device="cpu")
    assert bare.calibration is None
    images, questions = samples(2, seed=5)
    assert len(bare.generate(images, questions, max_new_tokens=1)) == 2  # router knob still works
    with pytest.raises(ValueError, match="has no calibration.json.*adaptive-m3 tune"):
        bare.generate(images, questions, budget="tokens<=4")


def test_cascade_without_router_pays_for_every_tried_scale(folders):
    plain = AdaptiveLMM.from_pretrained(folders / "model", device="cpu")
    lmm, scales = plain.lmm, list(plain.scales)
    images, questions = samples(8, seed=6)
    base = lmm.generate(images, questions, scale=scales[0], max_new_tokens=3)
    c = float(np.median([r.confidence for r in base]))  # half stop at once, half go on
    seen, handle = count_image_tokens(lmm)
    try:
        records = plain.generate(images, questions, cascade_threshold=c, max_new_tokens=3)
    finally:
        handle.remove()
    assert all(r.routed_by == "cascade" for r in records)
    assert all(r.tried_scales == scales[: len(r.tried_scales)] for r in records)
    assert all(r.visual_tokens == sum(r.tried_scales) for r in records)
    assert all(r.scale == r.tried_scales[-1] for r in records)
    assert {len(r.tried_scales) for r in records} != {1}
    for r, b in zip(records, base, strict=True):
        assert (len(r.tried_scales) == 1) == (b.confidence >= c)
    spent = sum(s for rows in seen for s in rows)
    assert spent == sum(r.visual_tokens for r in records)
    never = plain.generate(images, questions, cascade_threshold=float("inf"), max_new_tokens=1)
    assert all(r.visual_tokens == sum(scales) for r in never)
    once = plain.generate(images, questions, cascade_threshold=-float("inf"), max_new_tokens=1)
    assert all(r.visual_tokens == scales[0] for r in once)
    # a calibrated cascade knob (policy "cascade") needs no router
    tuned = TuneResult("cascade", c, {}, {})
    knob = plain.generate(images, questions, budget=tuned, max_new_tokens=3)
    assert [r.tried_scales for r in knob] == [r.tried_scales for r in records]


def test_router_for_other_scales_fails_at_load(folders, tmp_path):
    X = np.random.default_rng(0).normal(size=(20, 71)).astype(np.float32)
    correct = np.ones((20, 4), dtype=bool)
    correct[::2, 0] = False
    ScaleRouter("logreg", scales=(1, 4, 16, 64)).fit(X, correct).save(tmp_path)
    with pytest.raises(ValueError, match=r"trained for scales \(1, 4, 16, 64\)"):
        AdaptiveLMM.from_pretrained(folders / "model", tmp_path, device="cpu")


def test_router_for_other_features_fails_at_load(folders, tmp_path):
    X = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32)
    correct = np.ones((20, 3), dtype=bool)
    correct[::2, 0] = False
    ScaleRouter("logreg", scales=(1, 4, 16)).fit(X, correct).save(tmp_path)
    with pytest.raises(ValueError, match="router expects 5 features"):
        AdaptiveLMM.from_pretrained(folders / "model", tmp_path, device="cpu")


def test_bad_input_names_the_sample(adaptive):
    images, questions = samples(3, seed=7)
    with pytest.raises(ValueError, match="got 3 images for 2 questions"):
        adaptive.generate(images, questions[:2])
    with pytest.raises(ValueError, match="sample 1: empty_question: question is empty"):
        adaptive.generate(images, [questions[0], "  ", questions[2]])
    with pytest.raises(ValueError, match="sample 2: unreadable_image: expected a PIL image"):
        adaptive.generate([*images[:2], "not an image"], questions)
    with pytest.raises(ValueError, match="sample 0: empty_image: image has zero size"):
        adaptive.generate([Image.new("RGB", (0, 4)), *images[1:]], questions)
    assert adaptive.generate([], []) == []


def test_fixed_scale_and_invalid_scales(adaptive):
    images, questions = samples(4, seed=8)
    seen, handle = count_image_tokens(adaptive.lmm)
    try:
        records = adaptive.generate(images, questions, scale=4, max_new_tokens=2)
    finally:
        handle.remove()
    assert [r.scale for r in records] == [4] * 4 and seen == [[4] * 4]
    assert all(r.routed_by == "fixed" and r.tried_scales == [4] for r in records)
    assert adaptive.last_timing["route_s"] == 0
    for bad in (5, 576, "big", True):
        with pytest.raises(ValueError, match=r"one of this model's scales \[1, 4, 16\]"):
            adaptive.generate(images, questions, scale=bad)
    with pytest.raises(ValueError, match="a budget needs scale='auto'"):
        adaptive.generate(images, questions, scale=4, budget="tokens<=4")
