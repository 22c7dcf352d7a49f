"""Policies, oracles and evaluate_choice on hand-made arrays."""

import itertools

import numpy as np
import pytest

from predictor import (
    POLICIES,
    ROUTER_POLICIES,
    ProbeScores,
    ScaleRouter,
    budgeted_oracle_curve,
    cascade_policy,
    evaluate_choice,
    fixed_policy,
    oracle_point,
    oracle_scale_index,
    quantile_policy,
    random_policy,
    threshold_policy,
    utility_policy,
)
from predictor.policies import apply_policy, conservative_first, default_knobs

SCALES = (1, 9, 36, 144)


def test_threshold_picks_smallest_scale_reaching_tau_else_largest():
    P = np.array([[0.9, 0.1, 0.1, 0.1], [0.2, 0.6, 0.4, 0.9], [0.1, 0.2, 0.3, 0.4]])
    assert threshold_policy(P, SCALES, 0.5).tolist() == [0, 1, 3]
    assert threshold_policy(P, SCALES, 0.0).tolist() == [0, 0, 0]
    assert threshold_policy(P, SCALES, 1.01).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="4 columns but there are 3 scales"):
        threshold_policy(P, (1, 9, 36), 0.5)


def test_utility_trades_probability_for_cost():
    P = np.array([[0.5, 0.6, 0.9, 0.95]])
    cost = np.array(SCALES) / 144
    assert utility_policy(P, cost, 0.0).tolist() == [3]
    assert utility_policy(P, cost, 1.0).tolist() == [2]
    assert utility_policy(P, cost, 100.0).tolist() == [0]
    per_sample = np.tile(cost, (1, 1))
    assert utility_policy(P, per_sample, 1.0).tolist() == [2]


def test_cascade_returns_every_tried_scale():
    conf = np.array([[-0.1, -0.1, -0.1, -0.1], [-3.0, -2.0, -0.2, -0.1], [-5.0, -5.0, -5.0, -5.0]])
    idx, tried = cascade_policy(conf, -0.5)
    assert idx.tolist() == [0, 2, 3]
    assert tried.tolist() == [
        [True, False, False, False],
        [True, True, True, False],
        [True, True, True, True],
    ]
    correct = np.array([[1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=bool)
    ev = evaluate_choice(idx, correct, {"tokens": np.array(SCALES, float)}, tried)
    assert ev["accuracy"] == pytest.approx(2 / 3)
    assert ev["mean_tokens"] == pytest.approx((1 + (1 + 9 + 36) + (1 + 9 + 36 + 144)) / 3)
    assert ev["mean_flops"] is None and ev["mean_latency"] is None


def test_fixed_random_quantile():
    assert fixed_policy(3, -1).tolist() == [-1, -1, -1]
    r = random_policy(10_000, 4, [0.5, 0.5, 0, 0], seed=1)
    assert set(r.tolist()) == {0, 1} and abs(r.mean() - 0.5) < 0.03
    assert (random_policy(5, 4, seed=3) == random_policy(5, 4, seed=3)).all()
    with pytest.raises(ValueError, match="summing to 1"):
        random_policy(5, 4, [0.5, 0.2, 0, 0])
    Pc = np.array([[0.3, 0.3, 0.2, 0.2]])
    assert quantile_policy(Pc, 0.5).tolist() == [1]
    assert quantile_policy(Pc, 0.0).tolist() == [0]
    assert quantile_policy(Pc, 1.01).tolist() == [3]
    idx, tried = apply_policy("fixed", Pc, 36, SCALES)
    assert idx.tolist() == [2] and tried is None
    with pytest.raises(ValueError, match="unknown policy"):
        apply_policy("magic", Pc, 0.5, SCALES)


def test_the_registry_says_what_each_knob_is_and_who_runs_it():
    assert ROUTER_POLICIES == ("threshold", "utility")
    assert {n for n, p in POLICIES.items() if p.tunable} == {
        "threshold",
        "utility",
        "cascade",
        "quantile",
        "probe",
        "probe-cascade",
    }
    assert {n: p.knob_kind for n, p in POLICIES.items()} == {
        "threshold": "threshold",
        "utility": "weight",
        "cascade": "threshold",
        "quantile": "quantile",
        "probe": "weight",
        "probe-cascade": "weight",
        "fixed": "scale",
    }
    for name, policy in POLICIES.items():  # a router runs its own policies and "fixed" only
        if policy.needs_router or policy.knob_kind == "scale":
            assert ScaleRouter(policy=name).policy == name
        else:
            with pytest.raises(ValueError, match="unknown router policy"):
                ScaleRouter(policy=name)
    with pytest.raises(ValueError, match="'fixed' has no knob to tune"):
        default_knobs("fixed")
    P = np.array([[0.2, 0.7, 0.6, 0.9]])
    for name in ROUTER_POLICIES:  # the safe knob is the most accurate: argmax P here
        assert apply_policy(name, P, POLICIES[name].safe_knob, SCALES)[0].tolist() == [3]
    for knob in (float("nan"), float("inf"), True, None):
        with pytest.raises(ValueError, match="threshold policy: the knob must be a finite number"):
            apply_policy("threshold", P, knob, SCALES)
    with pytest.raises(ValueError, match="knob 37 is not one of the scales"):
        apply_policy("fixed", P, 37, SCALES)


def test_knob_grids_run_from_safest_to_cheapest():
    P = np.random.default_rng(0).random((50, 4))
    probe = ProbeScores({0: P, 1: P[::-1]}, P[:, ::-1], gate_threshold=0.5)
    for policy in (name for name, p in POLICIES.items() if p.tunable):
        order = conservative_first(policy, default_knobs(policy))
        scores = probe if POLICIES[policy].needs_probe else P
        spent = [apply_policy(policy, scores, k, SCALES)[0].mean() for k in (order[0], order[-1])]
        assert spent[0] >= spent[1], policy
    t = conservative_first("threshold", default_knobs("threshold"))
    assert threshold_policy(P, SCALES, t[0]).tolist() == [3] * 50


def test_oracle_definition_matches_m3():
    correct = np.array([[0, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=bool)
    idx, any_correct = oracle_scale_index(correct)
    assert idx.tolist() == [1, 0, 0, 3]
    assert any_correct.tolist() == [True, False, True, True]
    acc, tokens = oracle_point(correct, SCALES)
    assert acc == 0.75 and tokens == pytest.approx((9 + 1 + 1 + 144) / 4)


def _brute_force_best(correct, cost, budget):
    n, S = correct.shape
    best = -1.0
    for choice in itertools.product(range(S), repeat=n):
        c = np.array(choice)
        if cost[c].mean() <= budget + 1e-9:
            best = max(best, correct[np.arange(n), c].mean())
    return best


def test_budgeted_oracle_is_optimal_on_small_cases():
    rng = np.random.default_rng(0)
    cost = np.array([1.0, 4.0, 10.0])
    for _ in range(5):
        correct = rng.random((5, 3)) < 0.4
        curve = budgeted_oracle_curve(correct, cost)
        budgets = np.linspace(1, 10, 12)
        at = budgeted_oracle_curve(correct, cost, budgets)
        for b, acc in at:
            assert acc == pytest.approx(_brute_force_best(correct, cost, b))
        accs = [a for _, a in curve]
        assert accs == sorted(accs)
        assert curve[-1][1] == pytest.approx(correct.any(axis=1).mean())
    assert np.isnan(budgeted_oracle_curve(correct, cost, [0.5])[0][1])


def test_budgeted_oracle_reaches_oracle_point_and_accepts_per_sample_costs():
    correct = np.array([[0, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=bool)
    curve = budgeted_oracle_curve(correct, SCALES)
    acc, tokens = oracle_point(correct, SCALES)
    assert curve[-1] == (pytest.approx(tokens), pytest.approx(acc))
    assert curve[0] == (pytest.approx(1.0), pytest.approx(0.25))
    per_sample = np.tile(np.array(SCALES, float), (4, 1))
    assert budgeted_oracle_curve(correct, per_sample) == curve
    with pytest.raises(ValueError, match="cost_per_scale must have shape"):
        budgeted_oracle_curve(correct, [1, 2])


def test_evaluate_choice_validates_and_averages_per_sample_latency():
    correct = np.array([[1, 0], [0, 1]], dtype=bool)
    lat = np.array([[10.0, 20.0], [12.0, 30.0]])
    ev = evaluate_choice(np.array([0, 1]), correct, {"tokens": [1, 9], "latency": lat})
    assert ev["accuracy"] == 1.0 and ev["mean_tokens"] == 5.0 and ev["mean_latency"] == 20.0
    assert ev["scale_share"] == [0.5, 0.5]
    with pytest.raises(ValueError, match="chosen_idx"):
        evaluate_choice(np.array([0, 2]), correct, {"tokens": [1, 9]})
