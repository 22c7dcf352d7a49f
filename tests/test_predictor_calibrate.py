"""Budget tuning and the accuracy-loss guarantee, checked where the truth is known."""

import numpy as np
import pytest

from predictor import (
    parse_target,
    sweep,
    tune,
    tune_to_accuracy_loss,
    tune_to_budget,
)
from predictor.policies import apply_policy, default_knobs
from predictor.synthetic import make_synthetic


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
