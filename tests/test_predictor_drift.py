"""The drift test on numbers whose answer is known: same distribution, shifted, clustered."""

import warnings

import numpy as np
import pytest

from predictor.drift import (
    DriftMonitor,
    DriftWarning,
    _ks_p,
    drift_reference,
    load_drift_reference,
    save_drift_reference,
)
from predictor.serving import RouterFileError

SCALES = (1, 4, 16)
NAMES = [f"v1_{i}" for i in range(12)] + [f"q_{i}" for i in range(12)]
MIXING = np.random.default_rng(99).normal(size=(12, 12))
QUESTIONS = np.random.default_rng(98).normal(size=(15, 12))


def traffic(n: int, seed: int, image_shift: float = 0.0, repeat: int = 1) -> np.ndarray:
    """Correlated continuous image features (each image asked `repeat` questions) beside
    question features drawn from 15 fixed questions."""
    rng = np.random.default_rng(seed)
    images = np.repeat(rng.normal(size=(n // repeat, 12)) @ MIXING + image_shift, repeat, axis=0)
    return np.hstack([images, QUESTIONS[rng.integers(0, len(QUESTIONS), len(images))]])


def scores(X: np.ndarray) -> np.ndarray:
    """P(correct) rising with scale and with the first image feature: a router's output."""
    base = 1 / (1 + np.exp(-X[:, :1] / 4))
    return np.clip(base + np.array([0.0, 0.2, 0.4]), 0, 1)


@pytest.fixture(scope="module")
def reference():
    X = traffic(3000, seed=1)
    confidence = np.random.default_rng(2).normal(-0.3, 0.1, len(X))
    return drift_reference(X, NAMES, SCALES, scores(X), "threshold", 0.7, None, confidence)


def chosen(reference, X: np.ndarray) -> np.ndarray:
    from predictor.policies import threshold_policy

    return np.asarray(SCALES)[threshold_policy(scores(X), SCALES, reference.knob)]


def test_fresh_samples_stay_quiet_and_shifted_images_fire(reference):
    quiet = [
        reference.test(reference.statistics(X, chosen(reference, X)))
        for X in (traffic(512, seed) for seed in range(10, 20))
    ]
    assert not any(r.drifted for r in quiet)
    assert max(r.score for r in quiet) < 0.12
    X = traffic(512, seed=30, image_shift=1.0)
    report = reference.test(reference.statistics(X, chosen(reference, X)))
    assert report.drifted and report.p_value < 1e-6
    assert report.strongest[0]["statistic"].startswith("v1 ")


def test_a_shift_in_the_chosen_scales_or_the_confidence_fires(reference):
    X = traffic(512, seed=40)
    largest = np.full(len(X), SCALES[-1])
    assert reference.test(reference.statistics(X, largest)).drifted
    unsure = np.random.default_rng(3).normal(-0.6, 0.1, len(X))
    report = reference.test(reference.statistics(X, chosen(reference, X), unsure))
    assert report.drifted
    assert report.strongest[0]["statistic"] == "confidence at the smallest scale"


def test_an_image_asked_four_times_counts_once(reference):
    """Four questions per image are not four independent images: the p-value must be that of
    the distinct images, or clustered traffic raises false alarms."""
    X = traffic(256, seed=50, image_shift=0.5, repeat=4)
    as_calibrated = np.random.default_rng(5).choice(SCALES, len(X), p=reference.chosen_shares)
    stats = reference.statistics(X, as_calibrated)
    clustered = reference.test(stats).strongest[0]
    distinct = reference.test(stats[::4]).strongest[0]
    assert clustered["statistic"] == distinct["statistic"] and clustered["statistic"][:3] == "v1 "
    assert clustered["ks"] == distinct["ks"]
    assert clustered["p"] == pytest.approx(distinct["p"])
    assert _ks_p(clustered["ks"], 256, reference.n) < clustered["p"] / 10


def test_ks_p_value_matches_scipy():
    from scipy.stats import kstwo

    for d, n in ((0.05, 400), (0.1, 200), (0.2, 64)):
        m = 3000
        exact_one_sample = kstwo.sf(d, round(n * m / (n + m)))
        assert _ks_p(d, n, m) == pytest.approx(exact_one_sample, rel=0.25, abs=2e-3)


def test_monitor_window_warm_up_and_one_warning(reference):
    monitor = DriftMonitor(reference, window=300, min_samples=100)
    X = traffic(90, seed=60, image_shift=2.0)
    monitor.add(reference.statistics(X, chosen(reference, X)))
    assert not monitor.report().drifted and monitor.report().n == 90  # too few to tell
    X = traffic(400, seed=61, image_shift=2.0)
    monitor.add(reference.statistics(X, chosen(reference, X)))
    report = monitor.report()
    assert report.n == 300 and report.drifted
    with pytest.warns(DriftWarning, match="drifted from the calibration data"):
        monitor.warn(report)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.warn(report)  # once per monitor
    with pytest.raises(ValueError, match="window >= min_samples"):
        DriftMonitor(reference, window=10, min_samples=64)


def test_reference_round_trip_and_malformed_files(reference, tmp_path):
    save_drift_reference(reference, tmp_path)
    loaded = load_drift_reference(tmp_path)
    X = traffic(200, seed=70)
    stats = reference.statistics(X, chosen(reference, X))
    np.testing.assert_allclose(loaded.statistics(X, chosen(reference, X)), stats)
    assert loaded.test(stats) == reference.test(stats)
    assert load_drift_reference(tmp_path / "nowhere") is None
    (tmp_path / "drift.json").write_text('{"format": "something else"}')
    with pytest.raises(RouterFileError, match="drift.json: malformed drift reference"):
        load_drift_reference(tmp_path)
    with pytest.raises(ValueError, match="expects 24 features"):
        reference.statistics(X[:, :5], chosen(reference, X))
    with pytest.raises(ValueError, match=r"chosen scales \[9\]"):
        reference.statistics(X, np.full(len(X), 9))


def test_a_small_calibration_split_raises_no_false_alarm():
    """Few calibration rows in many dimensions: in-sample, new samples lie farther off the
    components than every calibration row, so the off-component reference is cross-fitted."""
    names = [f"v1_{i}" for i in range(64)]
    rng = np.random.default_rng(7)
    X = rng.normal(size=(48, 64))
    reference = drift_reference(X, names, SCALES, np.full((48, 3), 0.9), "threshold", 0.5)
    fresh = np.random.default_rng(8).normal(size=(256, 64))
    report = reference.test(reference.statistics(fresh, np.full(256, SCALES[0])))
    assert not report.drifted
    shifted = reference.test(reference.statistics(fresh * 3.0, np.full(256, SCALES[0])))
    assert shifted.drifted
