"""Budget tuning and the accuracy-loss guarantee, checked where the truth is known."""

import numpy as np
import pytest
from scipy.stats import binom

from predictor import (
    calibration_table,
    checked_target,
    parse_target,
    sweep,
    tune,
    tune_to_accuracy_loss,
    tune_to_budget,
)
from predictor.policies import apply_policy, default_knobs
from tests.routing_data import make_synthetic


@pytest.fixture(scope="module")
def calib():
    return make_synthetic(n=2000, n_features=6, seed=11)


def test_tune_to_budget_meets_each_cost_target(calib):
    d = calib
    for metric, target in (("tokens", 20.0), ("flops", 2.3e9), ("latency", 12.0)):
        res = tune_to_budget(d.p_true, d.correct, d.scales, d.costs, metric, target, "utility")
        assert res.metrics[f"mean_{metric}"] <= target
        curve = sweep("utility", d.p_true, d.correct, d.scales, d.costs)
        feasible = [p["accuracy"] for p in curve if p[f"mean_{metric}"] <= target]
        assert res.metrics["accuracy"] == max(feasible)
        assert res.target == {"metric": metric, "value": target}
    res = tune_to_budget(d.p_true, d.correct, d.scales, None, "tokens", 50.0)
    assert res.policy == "threshold" and res.metrics["mean_tokens"] <= 50
    casc = tune_to_budget(d.confidence, d.correct, d.scales, d.costs, "tokens", 30.0, "cascade")
    assert casc.metrics["mean_tokens"] <= 30  # counts every scale the cascade tried


def test_tune_to_budget_errors(calib):
    d = calib
    with pytest.raises(ValueError, match="cheapest reaches 1"):
        tune_to_budget(d.p_true, d.correct, d.scales, d.costs, "tokens", 0.5)
    with pytest.raises(ValueError, match="needs costs"):
        tune_to_budget(d.p_true, d.correct, d.scales, {"tokens": d.scales}, "flops", 1e9)
    with pytest.raises(ValueError, match="target_metric"):
        tune_to_budget(d.p_true, d.correct, d.scales, d.costs, "watts", 1.0)


def _loss_per_knob(scores, correct, scales, policy, knobs):
    """Population risk E[1(largest right, routed wrong)] and accuracy loss for every knob."""
    rows, largest = np.arange(len(correct)), correct[:, -1]
    risk, acc_loss = {}, {}
    for k in knobs:
        idx, _ = apply_policy(policy, scores, float(k), scales)
        routed = correct[rows, idx]
        risk[float(k)] = float(np.mean(largest & ~routed))
        acc_loss[float(k)] = float(largest.mean() - routed.mean())
    return risk, acc_loss


def _naive_knob(scores, correct, scales, policy, knobs, eps):
    """Cheapest knob whose calib accuracy loss <= eps, no correction for sampling error."""
    rows, largest = np.arange(len(correct)), correct[:, -1].mean()
    best, best_tokens = None, np.inf
    for k in knobs:
        idx, _ = apply_policy(policy, scores, float(k), scales)
        tokens = np.asarray(scales)[idx].mean()
        if largest - correct[rows, idx].mean() <= eps and tokens < best_tokens:
            best, best_tokens = float(k), tokens
    return best


@pytest.fixture(scope="module")
def population():
    return make_synthetic(n=100_000, n_features=4, seed=5)


@pytest.mark.parametrize("policy", ["threshold", "utility"])
def test_accuracy_loss_guarantee_holds_over_many_calibration_draws(population, policy):
    """Known population; many calib draws; P(true loss > epsilon) must stay <= delta.

    The router's scores are deliberately miscalibrated (overconfident): the guarantee may
    not lean on calibration. A naive rule (cheapest knob whose calib loss <= epsilon) is
    run alongside to show the test has teeth: it violates far more often than delta.
    """
    pop = population
    scores = pop.p_true**0.5
    eps, delta, n_cal, draws = 0.05, 0.1, 300, 300
    knobs = default_knobs(policy)
    risk, acc_loss = _loss_per_knob(scores, pop.correct, pop.scales, policy, knobs)
    rng = np.random.default_rng(0)
    violations = naive_violations = certified = 0
    for _ in range(draws):
        i = rng.choice(len(pop.correct), n_cal, replace=False)
        res = tune_to_accuracy_loss(scores[i], pop.correct[i], pop.scales, eps, delta, policy)
        if res.certified:
            certified += 1
            assert acc_loss[res.knob] <= risk[res.knob] + 1e-12
            violations += risk[res.knob] > eps
        else:
            assert res.policy == "fixed" and res.knob == 144.0
        naive = _naive_knob(scores[i], pop.correct[i], pop.scales, policy, knobs, eps)
        naive_violations += acc_loss[naive] > eps
    slack = 3 * np.sqrt(delta * (1 - delta) / draws)
    assert violations / draws <= delta + slack
    assert naive_violations / draws > 2 * delta
    assert certified / draws > 0.8  # and it is not vacuous: it usually certifies a cheaper knob


def test_accuracy_loss_result_fields_and_fallback(calib):
    d = calib
    res = tune_to_accuracy_loss(d.p_true, d.correct, d.scales, 0.02, 0.1, costs=d.costs)
    assert res.certified and res.policy == "threshold"
    assert res.details["empirical_risk"] <= 0.02 and res.details["p_value"] <= 0.1
    assert res.metrics["mean_tokens"] < 144 and res.metrics["mean_flops"] is not None
    assert res.to_dict()["target"] == {"metric": "accuracy_loss", "epsilon": 0.02, "delta": 0.1}
    # 20 samples can never certify a 1 % loss at delta 0.1: (0.99)^20 > 0.1.
    small = tune_to_accuracy_loss(d.p_true[:20], d.correct[:20], d.scales, 0.01, 0.1)
    assert not small.certified and (small.policy, small.knob) == ("fixed", 144.0)
    assert small.metrics["mean_tokens"] == 144
    casc = tune_to_accuracy_loss(d.confidence, d.correct, d.scales, 0.03, 0.1, "cascade")
    assert casc.policy in ("cascade", "fixed")
    with pytest.raises(ValueError, match="epsilon and delta"):
        tune_to_accuracy_loss(d.p_true, d.correct, d.scales, 0.0, 0.1)


def test_parse_target_and_tune_dispatch(calib):
    assert parse_target("tokens<=36") == {"metric": "tokens", "value": 36.0}
    assert parse_target("flops=2e9") == {"metric": "flops", "value": 2e9}
    assert parse_target("loss<=0.01@0.05") == {
        "metric": "accuracy_loss",
        "epsilon": 0.01,
        "delta": 0.05,
    }
    assert parse_target("loss=0.02")["delta"] == 0.1
    with pytest.raises(ValueError, match="cannot parse target"):
        parse_target("speed<=3")
    with pytest.raises(ValueError, match="only a loss target"):
        parse_target("tokens<=3@0.1")
    d = calib
    assert tune(d.p_true, d.correct, d.scales, d.costs, "tokens<=30").metrics["mean_tokens"] <= 30
    assert tune(d.p_true, d.correct, d.scales, d.costs, "loss<=0.03@0.1").certified
    with pytest.raises(ValueError, match="needs a metric and a number under 'value'"):
        tune(d.p_true, d.correct, d.scales, d.costs, {"metric": "tokens"})
    with pytest.raises(ValueError, match="'metric' must be one of"):
        checked_target({"metric": "watts", "value": 3})
    with pytest.raises(ValueError, match="a number under 'epsilon'"):
        checked_target({"metric": "accuracy_loss", "epsilon": "small"})
    assert checked_target({"metric": "accuracy_loss", "epsilon": 0.02})["delta"] == 0.1


def test_one_knob_loop_gives_sweeps_tables_and_tuning_the_same_rows(calib):
    d = calib
    for policy in ("threshold", "utility"):
        curve = sweep(policy, d.p_true, d.correct, d.scales, d.costs)
        table = calibration_table(d.p_true, d.correct, d.scales, d.costs, policy)
        assert table["rows"] == curve  # the same grid, the same evaluation
        for row in curve:
            idx, _ = apply_policy(policy, d.p_true, row["knob"], d.scales)
            assert row["losses"] == np.sum(d.correct[:, -1] & ~d.correct[np.arange(2000), idx])
        res = tune_to_accuracy_loss(d.p_true, d.correct, d.scales, 0.02, 0.1, policy, d.costs)
        at_knob = next(r for r in curve if r["knob"] == res.knob)
        assert res.metrics == {k: v for k, v in at_knob.items() if k not in ("knob", "losses")}


def uncertified_case(seed: int, flips: float, noise: float, n: int):
    """Labels over scales 1/9/36 (`flips`: the share right at a smaller scale only, as in real
    labels) and noisy scores; the "calib" rule's result and the utility curve."""
    rng = np.random.default_rng(seed)
    scales = (1, 9, 36)
    need = rng.integers(0, 4, n)  # 3: no scale answers
    correct = np.arange(3)[None, :] >= need[:, None]
    correct[rng.random(n) < flips, -1] = False
    P = np.clip(correct + rng.normal(0, noise, correct.shape), 0, 1)
    costs = {"tokens": np.array(scales, float)}
    res = tune_to_accuracy_loss(
        P, correct, scales, 0.01, 0.1, "utility", costs, uncertified="calib"
    )
    return res, sweep("utility", P, correct, scales, costs), correct, P


def test_the_calib_rule_keeps_the_certified_knob_when_there_is_one():
    res, curve, correct, P = uncertified_case(seed=0, flips=0.05, noise=0.2, n=3000)
    assert res.certified and res.details["rule"] == "certified"
    idx, _ = apply_policy("utility", P, res.knob, (1, 9, 36))
    harm = correct[:, -1] & ~correct[np.arange(len(correct)), idx]
    assert binom.cdf(harm.sum(), len(correct), 0.01) <= 0.1
    largest = correct[:, -1].mean()
    edge = [p for p in curve if largest - 0.01 <= p["accuracy"]]
    assert min(p["mean_tokens"] for p in edge) < res.metrics["mean_tokens"]  # not the edge's


def test_without_a_certificate_the_calib_rule_takes_the_cheapest_knob_without_calib_loss():
    res, curve, correct, _ = uncertified_case(seed=0, flips=0.05, noise=0.2, n=200)
    largest = correct[:, -1].mean()
    assert not res.certified and res.details["rule"] == "calib" and res.policy == "utility"
    assert res.metrics["accuracy"] >= largest
    assert all(
        p["mean_tokens"] >= res.metrics["mean_tokens"] for p in curve if p["accuracy"] >= largest
    )


def test_the_calib_rule_falls_back_to_the_one_point_edge_then_the_most_accurate_knob():
    res, curve, correct, P = uncertified_case(seed=1, flips=0.0, noise=0.3, n=200)
    largest = correct[:, -1].mean()
    assert res.details["rule"] == "calib" and all(p["accuracy"] < largest for p in curve)
    near = [p for p in curve if p["accuracy"] >= largest - 0.01]
    assert res.metrics["mean_tokens"] == min(p["mean_tokens"] for p in near)
    blind = np.zeros_like(P)  # every knob sends everything to the smallest scale: far below
    worst = tune_to_accuracy_loss(
        blind, correct, (1, 9, 36), 0.01, 0.1, "utility", None, None, "calib"
    )
    assert (worst.details["rule"], worst.policy, worst.knob) == ("most accurate", "utility", 0.0)
