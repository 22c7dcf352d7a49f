"""AdaptiveLMM on the micro model: routed scales reach the LLM, budgets move spending, errors."""

import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from m3core import MICRO, NestedLMM, tiny_lmm
from m3core.features import feature_names, probe_feature_names, router_features
from pipelines.adaptive import AdaptiveLMM
from predictor import ProbeRouter, ScaleRouter, TuneResult, calibration_table, save_calibration
from predictor.drift import drift_reference, save_drift_reference
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


def probes_at(lmm, images, questions, scales) -> dict[int, np.ndarray]:
    """Each probe scale's probe features, from a generate call of its own (as labelling)."""
    encoded, prompts = lmm.encode(images), lmm.tokenize(questions)
    return {
        s: np.stack([r.probe for r in lmm.generate(encoded, prompts, s, 2, probe=True)])
        for s in scales
    }


@pytest.fixture(scope="module")
def probe_folder(folders):
    """A probe router folder on the micro model: gate and probe routers fitted on the rule,
    a calibration table of probe-cascade on another draw, and a drift reference."""
    lmm = NestedLMM.from_pretrained(folders / "model", device="cpu")
    names = feature_names(lmm)
    column, S = names.index("v1_0"), len(lmm.scales)
    images, questions = samples(60, seed=1)
    X = features(lmm, images, questions)
    correct = rule_correct(X, column, S)
    probes = probes_at(lmm, images, questions, lmm.scales[:2])
    gate = ScaleRouter("logreg", scales=lmm.scales, C=10.0).fit(X, correct, feature_names=names)
    stages = {
        s: ScaleRouter("logreg", scales=lmm.scales, C=10.0).fit(
            np.hstack([X, p]), correct, feature_names=names + probe_feature_names(lmm)
        )
        for s, p in probes.items()
    }
    router = ProbeRouter(gate, stages, "probe-cascade", knob=0.3, gate_threshold=0.5)
    router.save(folders / "probe")
    cal_images, cal_questions = samples(60, seed=2)
    X_cal = features(lmm, cal_images, cal_questions)
    scores = router.scores(X_cal, probes_at(lmm, cal_images, cal_questions, lmm.scales[:2]))
    correct_cal = rule_correct(X_cal, column, S)
    table = calibration_table(scores, correct_cal, lmm.scales, None, "probe-cascade")
    save_calibration(table, folders / "probe")
    reference = drift_reference(X_cal, names, lmm.scales, scores.gate, "utility", 0.3)
    save_drift_reference(reference, folders / "probe")
    return folders / "probe"


@pytest.mark.parametrize("policy", ["probe-cascade", "probe"])
def test_serving_a_probe_router_equals_the_policy_on_the_same_features(
    folders, probe_folder, policy
):
    adaptive = AdaptiveLMM.from_pretrained(folders / "model", probe_folder, device="cpu")
    adaptive.router.set_params(policy=policy)
    lmm = adaptive.lmm
    images, questions = samples(16, seed=9)
    X = features(lmm, images, questions)
    probes = probes_at(lmm, images, questions, lmm.scales[:2])
    costs = adaptive.calibration["token_costs"]
    chosen, paid = adaptive.router.route(X, probes, costs=costs)
    assert len(set(chosen.tolist())) > 1 and paid.sum() > len(chosen)  # a real mix of both
    seen, handle = count_image_tokens(lmm)
    try:
        records = adaptive.generate(images, questions, max_new_tokens=3, batch_size=4)
    finally:
        handle.remove()
    assert [r.scale for r in records] == chosen.tolist()
    assert all(r.routed_by == policy for r in records)
    for record, row in zip(records, paid, strict=True):
        counted = Counter(record.tried_scales)
        assert [counted[s] for s in lmm.scales] == row.tolist()
        assert record.visual_tokens == sum(record.tried_scales)
    assert sum(s for rows in seen for s in rows) == sum(r.visual_tokens for r in records)
    for i, record in enumerate(records):  # the kept answer is the one its scale gives
        alone = lmm.generate([images[i]], [questions[i]], scale=record.scale, max_new_tokens=3)[0]
        assert (alone.token_ids, alone.text) == (record.token_ids, record.text)
    timing = adaptive.last_timing
    assert 0 < timing["route_s"] < timing["total_s"] and "drift_score" in timing
    assert 0 < timing["probe_prefill_s"] < timing["total_s"]
    assert sum(r.route_seconds for r in records) == pytest.approx(timing["route_s"])


def test_a_probe_router_takes_budgets_and_reports_what_it_cannot_do(folders, probe_folder):
    adaptive = AdaptiveLMM.from_pretrained(folders / "model", probe_folder, device="cpu")
    images, questions = samples(16, seed=10)

    def spent(budget):
        records = adaptive.generate(images, questions, budget=budget, max_new_tokens=2)
        return np.mean([r.visual_tokens for r in records])

    assert spent("tokens<=4") < spent("tokens<=12")
    assert spent(TuneResult("fixed", 16.0, {}, {})) == 16
    gate_only = adaptive.generate(images, questions, budget=TuneResult("utility", 0.0, {}, {}))
    assert {r.routed_by for r in gate_only} == {"router"}  # the gate is a router of its own
    encoded, prompts = adaptive.lmm.encode(images), adaptive.lmm.tokenize(questions)
    X = features(adaptive.lmm, images, questions)
    probes = probes_at(adaptive.lmm, images, questions, adaptive.scales[:2])
    costs = adaptive.calibration["token_costs"]
    fresh = AdaptiveLMM.from_pretrained(folders / "model", probe_folder, device="cpu")
    for policy, knob in (("probe", 0.3), ("probe-cascade", adaptive.router.knob)):
        routed = fresh.route(encoded, prompts, policy=policy, knob=knob)
        offline = adaptive.router.route(X, probes, knob, policy, costs=costs)
        np.testing.assert_array_equal(routed, offline[0])
    answered = adaptive.generate(images, questions, max_new_tokens=3)
    assert [r.scale for r in answered] == adaptive.route(encoded, prompts).tolist()
    plain = AdaptiveLMM.from_pretrained(folders / "model", folders / "router", device="cpu")
    with pytest.raises(ValueError, match="needs a probe router folder"):
        plain.generate(images, questions, budget=TuneResult("probe", 0.1, {}, {}))


def test_the_server_answers_through_a_probe_router_and_counts_every_prefill(folders, probe_folder):
    from pipelines.serve import BatchAnswerer
    from pipelines.serve_api import ChatRequest

    adaptive = AdaptiveLMM.from_pretrained(folders / "model", probe_folder, device="cpu")
    images, questions = samples(6, seed=11)
    pairs = zip(images, questions, strict=True)
    requests = [ChatRequest(i, q, "adaptive-m3", max_tokens=2) for i, q in pairs]
    answers = BatchAnswerer(adaptive)(requests)
    offline = adaptive.generate(images, questions, max_new_tokens=2)
    for answer, record, question in zip(answers, offline, questions, strict=True):
        assert (answer.text, answer.tried_scales) == (record.text, record.tried_scales)
        assert answer.routed_by == "probe-cascade"
        text = len(adaptive.lmm.tokenize([question]).ids[0]) - 1
        assert answer.prompt_tokens == record.visual_tokens + text * len(record.tried_scales)
