"""gap_closed on hand-made curves, no_loss_point, sweeps and the curve report."""

import json

import numpy as np
import pytest

from predictor import (
    budgeted_oracle_curve,
    fixed_points,
    frontier,
    gap_closed,
    group_prior,
    no_loss_point,
    oracle_point,
    sweep,
    write_curve_report,
)
from tests.routing_data import make_synthetic

FIXED = [(1, 0.3), (9, 0.5), (36, 0.6), (144, 0.65)]
ORACLE = [(1, 0.3), (2, 0.55), (6, 0.68), (20, 0.72)]


def test_gap_closed_is_zero_for_fixed_and_one_for_oracle():
    assert gap_closed(FIXED, FIXED, ORACLE) == pytest.approx(0.0)
    assert gap_closed(ORACLE, FIXED, ORACLE) == pytest.approx(1.0)
    # Points on the segments between fixed scales are what random mixing gets: still 0.
    mix = [(5, 0.4), (22.5, 0.55), (90, 0.625)]
    assert gap_closed(FIXED + mix, FIXED, ORACLE) == pytest.approx(0.0, abs=1e-12)
    assert gap_closed(mix, FIXED, ORACLE) < 0  # without the vertices it is below them


def test_gap_closed_in_between_and_below():
    worse = [(1, 0.3), (144, 0.5)]
    assert gap_closed(worse, FIXED, ORACLE) < 0
    between = [(1, 0.3), (4, 0.5), (20, 0.62), (100, 0.66)]
    g = gap_closed(between, FIXED, ORACLE)
    assert 0 < g < 1
    # A curve that never reaches down to the smallest scale falls back to it there.
    late = [(50, 0.72)]
    assert np.isfinite(gap_closed(late, FIXED, ORACLE))
    assert np.isnan(gap_closed(FIXED, FIXED, FIXED))


def test_gap_closed_accepts_sweep_records():
    recs = [{"mean_tokens": t, "accuracy": a, "knob": i} for i, (t, a) in enumerate(ORACLE)]
    assert gap_closed(recs, FIXED, ORACLE) == pytest.approx(1.0)


def test_frontier_is_monotone_concave_envelope():
    f = frontier([(1, 0.3), (2, 0.2), (4, 0.6), (8, 0.5), (16, 0.7), (32, 0.69)])
    assert f[:, 0].tolist() == [1, 4, 16]
    assert (np.diff(f[:, 1]) > 0).all()


def test_no_loss_point():
    curve = [
        {"knob": 0.1, "mean_tokens": 10.0, "accuracy": 0.60},
        {"knob": 0.5, "mean_tokens": 30.0, "accuracy": 0.70},
        {"knob": 0.9, "mean_tokens": 80.0, "accuracy": 0.71},
    ]
    assert no_loss_point(curve, 0.70)["knob"] == 0.5
    assert no_loss_point(curve, 0.71, tol=0.02)["knob"] == 0.5
    assert no_loss_point(curve, 0.72) is None
    assert no_loss_point([(5, 0.7), (3, 0.71)], 0.7) == {"mean_tokens": 3.0, "accuracy": 0.71}


def test_group_prior_is_each_groups_accuracy_and_the_overall_one_for_unseen_groups():
    correct = np.array([[0, 1], [1, 1], [0, 0], [0, 1]], dtype=bool)
    P = group_prior(correct, ["a", "a", "b", "b"], ["b", "a", "new"])
    np.testing.assert_allclose(P, [[0.0, 0.5], [0.5, 1.0], [0.25, 0.75]])
    with pytest.raises(ValueError, match="3 groups for 4 rows"):
        group_prior(correct, ["a", "a", "b"], ["a"])


def test_group_prior_routes_a_group_that_needs_detail_up_and_the_rest_down():
    # group "fine" is right only at the largest scale; "global" at every scale
    correct = np.array([[1, 1], [1, 1], [0, 1], [0, 1]], dtype=bool)
    groups = ["global", "global", "fine", "fine"]
    P = group_prior(correct, groups, groups)
    curve = sweep("utility", P, correct, (1, 144), knobs=[0.5])
    assert curve[0]["accuracy"] == 1.0
    assert curve[0]["mean_tokens"] == pytest.approx((1 + 1 + 144 + 144) / 4)


@pytest.fixture(scope="module")
def synth():
    return make_synthetic(n=1500, n_features=8, seed=3)


def test_true_probabilities_beat_fixed_scales_with_utility(synth):
    fp = fixed_points(synth.correct, synth.scales, synth.costs)
    bo = budgeted_oracle_curve(synth.correct, synth.scales)
    curve = sweep("utility", synth.p_true, synth.correct, synth.scales, synth.costs)
    assert 0.15 < gap_closed(curve, fp, bo) < 1
    largest = fp[-1]["accuracy"]
    assert no_loss_point(curve, largest, tol=0.01)["mean_tokens"] < 144
    extremes = sorted(curve, key=lambda p: p["mean_tokens"])
    assert extremes[0]["mean_tokens"] == 1 and extremes[-1]["mean_tokens"] > 100


def test_sweep_covers_every_policy_and_cost(synth):
    for policy, scores in (
        ("threshold", synth.p_true),
        ("utility", synth.p_true),
        ("cascade", synth.confidence),
    ):
        curve = sweep(policy, scores, synth.correct, synth.scales, synth.costs)
        toks = [p["mean_tokens"] for p in curve]
        assert min(toks) == pytest.approx(1.0)
        assert all(p["mean_flops"] > 0 and p["mean_latency"] > 0 for p in curve)
    cascade = sweep("cascade", synth.confidence, synth.correct, synth.scales, synth.costs)
    assert max(p["mean_tokens"] for p in cascade) == pytest.approx(sum(synth.scales))
    with pytest.raises(ValueError, match="scores have shape"):
        sweep("threshold", synth.p_true[:10], synth.correct, synth.scales)


def test_write_curve_report(tmp_path, synth):
    fp = fixed_points(synth.correct, synth.scales, synth.costs)
    bo = budgeted_oracle_curve(synth.correct, synth.scales)
    curves = {
        "true-p/utility": sweep("utility", synth.p_true, synth.correct, synth.scales, synth.costs),
        "cascade": sweep("cascade", synth.confidence, synth.correct, synth.scales, synth.costs),
    }
    paths = write_curve_report(
        tmp_path / "rep", curves, fp, oracle_point(synth.correct, synth.scales), bo, "synthetic"
    )
    report = json.loads(paths["json"].read_text())
    assert set(report["curves"]) == set(curves)
    assert report["curves"]["true-p/utility"]["gap_closed"] > 0.15
    assert report["budgeted_oracle"]["no_loss_tokens"] < 144
    md = paths["markdown"].read_text()
    assert "| true-p/utility |" in md and "## Fixed scales" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
