"""The drift monitor inside AdaptiveLMM on the micro model: quiet on fresh samples of the
calibration distribution, firing once on blurred images, and serving the largest scale in
conservative mode."""

import warnings

import numpy as np
import pytest
from PIL import ImageFilter

from data.synthetic import make_split, vocabulary
from m3core import MICRO, tiny_lmm
from m3core.features import feature_names, router_features
from pipelines.adaptive import AdaptiveLMM
from predictor import ScaleRouter
from predictor.drift import DriftWarning, drift_reference, save_drift_reference


def split(images: int, seed: int) -> tuple[list, list[str]]:
    rows = make_split("calib", images, seed=seed, image_size=32)
    return rows["image"], rows["question"]


def blurred(images: list) -> list:
    return [image.filter(ImageFilter.GaussianBlur(2)) for image in images]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A micro model and a router folder whose drift reference comes from held-out calib
    samples, as `tune_router` writes it."""
    root = tmp_path_factory.mktemp("drift")
    lmm = tiny_lmm(vocabulary(), MICRO, seed=0)
    lmm.save_pretrained(root / "model")
    names = feature_names(lmm)

    def features(images, questions):
        return router_features(lmm, lmm.encode(images), questions)

    X_fit = features(*split(60, seed=1))
    rank = np.argsort(np.argsort(X_fit[:, 0])) / len(X_fit)
    correct = rank[:, None] < (np.arange(3) + 1)[None, :] / 3
    router = ScaleRouter("logreg", scales=lmm.scales, policy="threshold", knob=0.5).fit(
        X_fit, correct, feature_names=names
    )
    router.save(root / "router")
    X_cal = features(*split(160, seed=2))
    reference = drift_reference(
        X_cal, names, lmm.scales, router.predict_proba(X_cal), "threshold", 0.5
    )
    save_drift_reference(reference, root / "router")
    return root


def served(folders, on_drift: str = "warn") -> AdaptiveLMM:
    return AdaptiveLMM.from_pretrained(
        folders / "model", folders / "router", device="cpu", on_drift=on_drift
    )


def test_quiet_on_fresh_samples_and_warns_once_on_blurred_images(folders):
    model = served(folders)
    images, questions = split(128, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DriftWarning)
        records = model.generate(images, questions, max_new_tokens=1)
    assert all(r.routed_by == "router" for r in records)
    assert model.last_timing["drift_n"] == len(records)
    assert model.last_timing["drift_p"] > 0.01 and not model.last_drift.drifted

    model = served(folders)
    with pytest.warns(DriftWarning, match="drift score") as caught:
        records = model.generate(blurred(images), questions, max_new_tokens=1)
        model.generate(blurred(images[:32]), questions[:32], max_new_tokens=1)
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the caller
    assert model.last_drift.drifted and model.last_timing["drift_p"] < 1e-3
    assert not model.last_drift.strongest[0]["statistic"].startswith("q ")  # images moved
    assert all(r.routed_by == "router" for r in records)  # warn only: routing goes on


def test_conservative_mode_answers_as_the_largest_scale(folders):
    images, questions = blurred(split(128, seed=4)[0]), split(128, seed=4)[1]
    model = served(folders, on_drift="conservative")
    with pytest.warns(DriftWarning, match="largest scale"):
        records = model.generate(images, questions, max_new_tokens=2)
    largest = model.lmm.scales[-1]
    assert {r.routed_by for r in records} == {"drift"}
    assert {r.scale for r in records} == {largest}
    plain = model.lmm.generate(images, questions, scale=largest, max_new_tokens=2)
    assert [r.text for r in records] == [r.text for r in plain]  # so its accuracy, too
    assert np.isnan(model.last_drift_stats[:, -1]).all()  # routed: no smallest-scale answer
    fixed = model.generate(images[:4], questions[:4], scale=1, max_new_tokens=1)
    assert {r.scale for r in fixed} == {1}  # an explicit scale is the caller's choice
    confidence = model.last_drift_stats[:, -1]
    np.testing.assert_allclose(confidence, [r.confidence for r in fixed], rtol=1e-6)
