"""The probe policies on hand-made arrays: choices, what they pay, calibration, router folders."""

import json

import numpy as np
import pytest

from predictor import (
    POLICIES,
    PROBE_POLICIES,
    ROUTER_POLICIES,
    ProbeRouter,
    ProbeScores,
    RouterFileError,
    ScaleRouter,
    StagedRoute,
    calibration_table,
    cascade_policy,
    chance_corrected,
    evaluate_choice,
    knob_for_target,
    load_router,
    plurality_share,
    sweep,
    tune_to_accuracy_loss,
)
from predictor.policies import apply_policy, default_knobs
from tests.routing_data import make_synthetic

SCALES = (1, 4, 16)
TOKENS = np.array(SCALES, dtype=float)
VISION, LLM = 100.0, np.array([10.0, 40.0, 160.0])  # FLOPs: the tower once, a prefill per try
COSTS = {"tokens": TOKENS, "flops": VISION + LLM, "vision_flops": VISION}


def test_registry_lists_the_probe_policies_apart_from_the_router_ones():
    assert PROBE_POLICIES == ("probe", "probe-cascade")
    assert set(PROBE_POLICIES).isdisjoint(ROUTER_POLICIES)
    for name in PROBE_POLICIES:
        entry = POLICIES[name]
        assert entry.needs_probe and not entry.needs_router and entry.knob_kind == "weight"
        assert entry.safe_knob == 0.0 and entry.spend_grows_with_knob is False
        np.testing.assert_array_equal(default_knobs(name), default_knobs("utility"))


def test_probe_pays_its_prefill_on_every_sample_even_when_it_answers_there():
    P = np.array([[0.9, 0.1, 0.1], [0.2, 0.9, 0.5], [0.1, 0.3, 0.9]])
    scores = ProbeScores({0: P})
    idx, paid = apply_policy("probe", scores, 0.0, SCALES)
    assert idx.tolist() == [0, 1, 2]
    assert paid.tolist() == [[2, 0, 0], [1, 1, 0], [1, 0, 1]]
    correct = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=bool)
    ev = evaluate_choice(idx, correct, COSTS, paid)
    assert ev["mean_tokens"] == pytest.approx(((1 + 1) + (1 + 4) + (1 + 16)) / 3)
    llm = (2 * LLM[0]) + (LLM[0] + LLM[1]) + (LLM[0] + LLM[2])
    assert ev["mean_flops"] == pytest.approx(VISION + llm / 3)  # the tower once per image
    assert ev["accuracy"] == 1.0
    # a cost weight moves every sample to the smallest scale, still paying the probe
    idx, paid = apply_policy("probe", scores, 100.0, SCALES)
    assert idx.tolist() == [0, 0, 0] and paid[:, 0].tolist() == [2, 2, 2]


def test_probe_cascade_gates_keeps_escalates_and_pays_every_attempt():
    gate = np.array(
        [
            [0.9, 0.9, 0.9],  # starts at 1 token
            [0.8, 0.9, 0.9],  # starts at 1 token
            [0.2, 0.5, 0.9],  # gate sends it straight to 16
            [0.2, 0.9, 0.5],  # gate sends it to 4, the second probe scale
        ]
    )
    stage0 = np.array(
        [
            [0.9, 0.9, 0.9],  # keep the 1-token answer
            [0.1, 0.9, 0.9],  # move to 4
            [0.0, 0.0, 0.0],  # never asked
            [0.0, 0.0, 0.0],  # never asked
        ]
    )
    stage1 = np.array(
        [
            [0.0, 0.0, 0.0],
            [0.1, 0.9, 0.95],  # keep at 4: 0.95 - 16/16 * lam does not beat 0.9 - 0
            [0.0, 0.0, 0.0],
            [0.1, 0.2, 0.9],  # move to 16
        ]
    )
    scores = ProbeScores({0: stage0, 1: stage1}, gate, gate_threshold=0.5)
    idx, paid = apply_policy("probe-cascade", scores, 0.2, SCALES)
    assert idx.tolist() == [0, 1, 2, 2]
    assert paid.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1]]
    correct = np.ones((4, 3), dtype=bool)
    ev = evaluate_choice(idx, correct, COSTS, paid)
    assert ev["mean_tokens"] == pytest.approx((1 + (1 + 4) + 16 + (4 + 16)) / 4)
    llm = LLM[0] + (LLM[0] + LLM[1]) + LLM[2] + (LLM[1] + LLM[2])
    assert ev["mean_flops"] == pytest.approx(VISION + llm / 4)
    assert ev["scale_share"] == [0.25, 0.25, 0.5]
    # threshold 0 starts everyone at 1 token: a plain probe cascade
    idx, paid = apply_policy("probe-cascade", scores.with_threshold(0.0), 0.2, SCALES)
    assert paid[:, 0].tolist() == [1, 1, 1, 1]


def test_a_staged_route_driven_by_subsets_equals_the_policy_on_full_arrays():
    rng = np.random.default_rng(0)
    n, S = 200, 3
    scores = ProbeScores(
        {0: rng.random((n, S)), 1: rng.random((n, S))}, rng.random((n, S)), gate_threshold=0.4
    )
    cost = TOKENS / TOKENS[-1]
    for policy in PROBE_POLICIES:
        expected = apply_policy(policy, scores, 0.3, SCALES)
        route = StagedRoute(policy, np.tile(cost, (n, 1)), 0.3, [0, 1], scores.gate, 0.4)
        for k in route.stages:
            rows = route.at(k)  # serving asks its probe router about these samples only
            route.observe(k, rows, scores.stages[k][rows])
        idx, paid = route.finish()
        np.testing.assert_array_equal(idx, expected[0])
        np.testing.assert_array_equal(paid, expected[1])
        assert (paid[np.arange(n), idx] >= 1).all()


def test_the_confidence_cascade_counts_the_vision_tower_once():
    conf = np.array([[-0.1, -0.1, -0.1], [-3.0, -0.2, -0.1], [-5.0, -5.0, -5.0]])
    idx, tried = cascade_policy(conf, -0.5)
    ev = evaluate_choice(idx, np.ones((3, 3), bool), COSTS, tried)
    llm = LLM[0] + (LLM[0] + LLM[1]) + LLM.sum()
    assert ev["mean_flops"] == pytest.approx(VISION + llm / 3)
    without = {k: v for k, v in COSTS.items() if k != "vision_flops"}  # older label folders
    over = evaluate_choice(idx, np.ones((3, 3), bool), without, tried)["mean_flops"]
    assert over == pytest.approx((tried * (VISION + LLM)).sum(1).mean())


def test_oracle_a_drops_plurality_wins_below_the_largest_scale():
    correct = np.array([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=bool)
    gold = np.array([[0.4, 0.9, 0.9], [0.6, 0.1, 0.3], [0.1, 0.45, 0.2], [np.nan, 0.2, 0.4]])
    A = chance_corrected(correct, gold)
    assert A.tolist() == [
        [False, True, True],
        [True, False, True],  # the largest scale keeps its greedy credit (P 0.3)
        [False, False, False],
        [True, False, True],  # unknown P(gold) keeps the credit
    ]
    np.testing.assert_allclose(plurality_share(correct, gold), [1 / 4, 2 / 4, 2 / 4])
    with pytest.raises(ValueError, match="gold_prob has shape"):
        chance_corrected(correct, gold[:, :2])


def synthetic_probe(d, seed=0):
    """ProbeScores where the probe at a scale knows that scale's correctness better than the
    gate does, and every score is overconfident."""
    rng = np.random.default_rng(seed)
    gate = d.p_true**0.5
    stages = {}
    for k in (0, 1):
        P = d.p_true.copy()
        P[:, k] = np.clip(0.75 * d.correct[:, k] + 0.2 + 0.05 * rng.random(len(P)), 0, 1)
        stages[k] = P**0.5
    return ProbeScores(stages, gate, gate_threshold=0.5)


def test_learn_then_test_certifies_the_staged_policy_over_calibration_draws():
    pop = make_synthetic(n=40_000, n_features=4, seed=5)
    scores = synthetic_probe(pop)
    eps, delta, n_cal, draws = 0.05, 0.1, 300, 150
    knobs = default_knobs("probe-cascade")
    rows, largest = np.arange(len(pop.correct)), pop.correct[:, -1]
    risk = {}
    for k in knobs:
        idx, _ = apply_policy("probe-cascade", scores, float(k), pop.scales)
        risk[float(k)] = float(np.mean(largest & ~pop.correct[rows, idx]))
    rng = np.random.default_rng(0)
    violations = certified = 0
    for _ in range(draws):
        i = rng.choice(len(pop.correct), n_cal, replace=False)
        part = ProbeScores({k: P[i] for k, P in scores.stages.items()}, scores.gate[i], 0.5)
        res = tune_to_accuracy_loss(part, pop.correct[i], pop.scales, eps, delta, "probe-cascade")
        certified += bool(res.certified)
        violations += bool(res.certified) and risk[res.knob] > eps
    assert violations / draws <= delta + 3 * np.sqrt(delta * (1 - delta) / draws)
    assert certified / draws > 0.8


def test_calibration_table_answers_budgets_for_the_staged_policy_as_tuning_does(tmp_path):
    d = make_synthetic(n=1500, n_features=4, seed=3)
    scores = synthetic_probe(d)
    costs = {**d.costs, "vision_flops": 1.0e9}
    table = json.loads(
        json.dumps(calibration_table(scores, d.correct, d.scales, costs, "probe-cascade"))
    )
    direct = tune_to_accuracy_loss(scores, d.correct, d.scales, 0.02, 0.1, "probe-cascade", costs)
    assert direct.certified and direct.policy == "probe-cascade"
    assert knob_for_target(table, "loss<=0.02@0.1").knob == direct.knob
    budget = knob_for_target(table, "tokens<=20")
    curve = sweep("probe-cascade", scores, d.correct, d.scales, costs)
    fits = [p for p in curve if p["mean_tokens"] <= 20]
    assert budget.metrics["accuracy"] == max(p["accuracy"] for p in fits)
    # FLOPs rows count the tower once: below the same choices paid with it per attempt
    no_vision = sweep("probe-cascade", scores, d.correct, d.scales, d.costs)
    assert all(a["mean_flops"] <= b["mean_flops"] for a, b in zip(curve, no_vision, strict=True))
    with pytest.raises(ValueError, match="reads ProbeScores"):
        sweep("probe-cascade", d.p_true, d.correct, d.scales)
    with pytest.raises(ValueError, match="not ProbeScores"):
        sweep("utility", scores, d.correct, d.scales)


def fitted_probe_router() -> tuple[ProbeRouter, np.ndarray, dict]:
    d = make_synthetic(n=400, n_features=6, seed=7)
    names = [f"v1_{i}" for i in range(6)]
    rng = np.random.default_rng(1)
    probes = {s: rng.normal(size=(400, 3)).astype(np.float32) for s in d.scales[:2]}
    gate = ScaleRouter("logreg", scales=d.scales, C=1.0).fit(d.X, d.correct, feature_names=names)
    stages = {
        s: ScaleRouter("logreg", scales=d.scales, C=1.0).fit(
            np.hstack([d.X, p]), d.correct, feature_names=names + ["p0", "p1", "p2"]
        )
        for s, p in probes.items()
    }
    return ProbeRouter(gate, stages, "probe-cascade", 0.05, 0.6), d.X, probes


def test_probe_router_folder_round_trip(tmp_path):
    router, X, probes = fitted_probe_router()
    router.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gate",
        "probe-1",
        "probe-9",
        "probe.json",
    ]
    loaded = load_router(tmp_path, expected_scales=router.scales_)
    assert isinstance(loaded, ProbeRouter)
    assert (loaded.policy, loaded.knob, loaded.gate_threshold) == ("probe-cascade", 0.05, 0.6)
    assert loaded.probe_scales == (1, 9) and loaded.probe_width(9) == 3
    expected, got = router.scores(X, probes), loaded.scores(X, probes)
    np.testing.assert_allclose(got.gate, expected.gate, atol=1e-5)
    for k in expected.stages:
        np.testing.assert_allclose(got.stages[k], expected.stages[k], atol=1e-5)
    chosen, paid = loaded.route(X, probes)
    assert set(chosen.tolist()) <= set(router.scales_) and paid.sum(1).min() >= 1
    saved_gate = json.loads((tmp_path / "gate" / "router.json").read_text())
    assert (saved_gate["policy"], saved_gate["knob"]) == ("utility", 0.05)  # what drift replays
    assert isinstance(load_router(tmp_path / "gate"), ScaleRouter)
    meta = json.loads((tmp_path / "probe.json").read_text())
    (tmp_path / "probe.json").write_text(json.dumps({**meta, "policy": "utility"}))
    with pytest.raises(RouterFileError, match="probe.json.*serves"):
        load_router(tmp_path)
    (tmp_path / "probe.json").write_text("{")
    with pytest.raises(RouterFileError, match="malformed probe router file"):
        load_router(tmp_path)
    with pytest.raises(ValueError, match="must read the gate's 6 features"):
        ProbeRouter(router.gate, {1: router.gate})
