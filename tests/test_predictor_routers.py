"""ScaleRouter: learning, ONNX serving, bad input, model selection, the baseline classifier."""

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import KFold, cross_val_score

from predictor import (
    OracleScaleClassifier,
    RouterFileError,
    ScaleRouter,
    budgeted_oracle_curve,
    fixed_points,
    gap_closed,
    scale_scores,
    select_router,
    sweep,
)
from tests.routing_data import make_synthetic

FAST = {
    "logreg": {"C": 1.0},
    "lightgbm": {"n_estimators": 40, "num_leaves": 7, "learning_rate": 0.1},
    "mlp": {"hidden": (32,), "epochs": 25, "lr": 5e-3},
}


@pytest.fixture(scope="module")
def data():
    d = make_synthetic(n=1600, n_features=12, seed=7)
    tr, te = np.arange(1000), np.arange(1000, 1600)
    costs_te = {**d.costs, "latency": d.costs["latency"][te]}
    return d, tr, te, costs_te


@pytest.fixture(scope="module")
def fitted(data):
    d, tr, _, _ = data
    names = [f"feat_{j}" for j in range(d.X.shape[1])]
    return {
        est: ScaleRouter(est, scales=d.scales, **params).fit(
            d.X[tr], d.correct[tr], feature_names=names
        )
        for est, params in FAST.items()
    }


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    root = tmp_path_factory.mktemp("routers")
    return {est: r.save(root / est) for est, r in fitted.items()}


@pytest.mark.parametrize("est", list(FAST))
def test_router_learns_and_beats_fixed_scales(data, fitted, est):
    d, _, te, costs = data
    r = fitted[est]
    P = r.predict_proba(d.X[te])
    assert P.shape == (len(te), 4) and ((P >= 0) & (P <= 1)).all()
    assert r.scales_ == d.scales and r.feature_spec_.width == 12 and r.n_features_in_ == 12
    assert r.feature_spec_.names[0] == "feat_0" and r.backend == "native"
    fp = fixed_points(d.correct[te], d.scales, costs)
    bo = budgeted_oracle_curve(d.correct[te], d.scales)
    curve = sweep("utility", P, d.correct[te], d.scales, costs)
    assert gap_closed(curve, fp, bo) > 0.1
    chosen = r.route(d.X[te])
    assert set(np.unique(chosen)) <= set(d.scales) and chosen.dtype == np.int64


@pytest.mark.parametrize("est", list(FAST))
def test_onnx_matches_native(data, fitted, saved, est):
    d, _, te, _ = data
    loaded = ScaleRouter.load(saved[est], expected_scales=(1, 9, 36, 144))
    assert loaded.backend == "onnx" and loaded.providers == ["CPUExecutionProvider"]
    native = fitted[est].predict_proba(d.X[te])
    np.testing.assert_allclose(loaded.predict_proba(d.X[te]), native, atol=1e-5, rtol=0)
    np.testing.assert_allclose(loaded.predict_proba(d.X[te][:1]), native[:1], atol=1e-5, rtol=0)
    for policy, knob in (("threshold", 0.6), ("utility", 0.5)):
        a = loaded.route(d.X[te], knob=knob, policy=policy)
        b = fitted[est].route(d.X[te], knob=knob, policy=policy)
        assert (a != b).mean() < 0.01  # only exact ties with the knob may flip
    assert loaded.get_params() == fitted[est].get_params()
    assert loaded.feature_spec_ == fitted[est].feature_spec_
    assert sorted(p.name for p in saved[est].iterdir()) == ["model.onnx", "router.json"]


def test_constant_scale_labels_survive_onnx(data, tmp_path):
    d, tr, te, _ = data
    correct = d.correct[tr].copy()
    correct[:, -1] = True  # every answer right at the largest scale
    correct[:, 0] = False
    for est in ("lightgbm", "logreg"):
        r = ScaleRouter(est, scales=d.scales, **FAST[est]).fit(d.X[tr], correct)
        P = r.predict_proba(d.X[te])
        assert np.allclose(P[:, -1], (len(tr) + 1) / (len(tr) + 2))
        loaded = ScaleRouter.load(r.save(tmp_path / est))
        np.testing.assert_allclose(loaded.predict_proba(d.X[te]), P, atol=1e-5, rtol=0)


def test_bad_features_give_clear_errors(data, fitted, saved):
    d, _, te, _ = data
    X = d.X[te][:20].copy()
    for r in (fitted["lightgbm"], ScaleRouter.load(saved["lightgbm"])):
        with pytest.raises(ValueError, match="width 11 but the router was trained on 12"):
            r.predict_proba(X[:, :11])
        bad = X.copy()
        bad[3, 2], bad[7, 5], bad[9, 0] = np.nan, np.inf, -np.inf
        with pytest.raises(
            ValueError, match=r"NaN in rows \[3\] \(features feat_2\).*inf in rows \[7, 9\]"
        ):
            r.route(bad)
        with pytest.raises(ValueError, match="reshape"):
            r.predict_proba(X[0])


def test_out_of_range_fallback(data, fitted):
    d, tr, te, _ = data
    X = d.X[te][:50].copy()
    X[:10, 4] = 50.0  # far outside anything seen in training
    r = fitted["logreg"]
    assert r.out_of_range(X).tolist() == [True] * 10 + [False] * 40
    plain = r.route(X, knob=0.3)
    safe = clone(r).set_params(fallback_out_of_range=True).fit(d.X[tr], d.correct[tr])
    routed = safe.route(X, knob=0.3)
    assert (routed[:10] == 144).all() and (routed[10:] == plain[10:]).all()


def test_params_api(fitted):
    r = ScaleRouter("lightgbm", scales=(1, 4), knob=0.7, n_estimators=10)
    p = r.get_params()
    assert p["estimator"] == "lightgbm" and p["knob"] == 0.7 and p["n_estimators"] == 10
    assert p["scales"] == (1, 4)
    assert p["num_leaves"] == 15  # defaults filled in
    c = clone(r)
    assert c.get_params() == p
    r.set_params(policy="utility", knob=2.0, num_leaves=7)
    assert r.policy == "utility" and r.get_params()["num_leaves"] == 7
    r.set_params(estimator="logreg", C=0.5)
    assert r.get_params()["C"] == 0.5 and "num_leaves" not in r.get_params()
    with pytest.raises(ValueError, match="does not take"):
        ScaleRouter("logreg", num_leaves=3)
    with pytest.raises(ValueError, match="unknown estimator"):
        ScaleRouter("xgboost")
    with pytest.raises(ValueError, match="unknown router policy"):
        ScaleRouter(policy="cascade")
    with pytest.raises(NotFittedError, match="call fit"):
        ScaleRouter().predict_proba(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="needs scales="):
        ScaleRouter("logreg").fit(np.zeros((4, 2)), np.ones((4, 2)))
    logreg = fitted["logreg"]
    assert logreg.route(np.zeros((2, 12)), policy="fixed", knob=36).tolist() == [36, 36]
    with pytest.raises(ValueError, match="knob 37 is not one of the scales"):
        logreg.route(np.zeros((2, 12)), policy="fixed", knob=37)
    with pytest.raises(ValueError, match="utility policy: the knob must be a finite number"):
        logreg.route(np.zeros((2, 12)), policy="utility", knob=float("nan"))


def test_clone_and_cross_val_score_drive_the_router(data):
    """scikit-learn's own tools: a clone is unfitted with equal parameters, and
    cross_val_score fits clones on each fold and scores them with `score`."""
    d, tr, _, _ = data
    router = ScaleRouter("logreg", scales=d.scales, policy="utility", knob=0.2, C=0.5)
    router.fit(d.X[tr], d.correct[tr])
    copy = clone(router)
    assert copy.get_params() == router.get_params() and not hasattr(copy, "model_")
    folds = KFold(n_splits=3, shuffle=True, random_state=0)
    scores = cross_val_score(copy, d.X[tr], d.correct[tr], cv=folds)
    expected = []
    for fit_rows, held_out in folds.split(d.X[tr]):
        fold = clone(router).fit(d.X[tr][fit_rows], d.correct[tr][fit_rows])
        P = fold.predict_proba(d.X[tr][held_out])
        expected.append(-scale_scores(d.correct[tr][held_out], P)["log_loss"])
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    assert -0.7 < scores.mean() < 0  # better than a coin (log 2) on learnable labels


def test_logreg_thread_cap_changes_speed_not_the_fit(data):
    d, tr, te, _ = data
    capped = ScaleRouter("logreg", scales=d.scales, C=1.0).fit(d.X[tr], d.correct[tr])
    free = ScaleRouter("logreg", scales=d.scales, C=1.0, num_threads=None)
    free.fit(d.X[tr], d.correct[tr])
    assert capped.get_params()["num_threads"] == 1
    np.testing.assert_allclose(
        capped.predict_proba(d.X[te]), free.predict_proba(d.X[te]), atol=1e-6
    )


def test_fit_rejects_bad_labels(data):
    d, tr, _, _ = data
    with pytest.raises(ValueError, match="3 columns but there are 4 scales"):
        ScaleRouter("logreg", scales=d.scales).fit(d.X[tr], d.correct[tr][:, :3])
    with pytest.raises(ValueError, match="strictly ascending"):
        ScaleRouter("logreg", scales=(9, 1, 36, 144)).fit(d.X[tr], d.correct[tr])
    with pytest.raises(ValueError, match="rows but X has"):
        ScaleRouter("logreg", scales=d.scales).fit(d.X[tr], d.correct[tr][:10])


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_load_errors_name_the_file(saved, tmp_path):
    src = saved["logreg"]
    with pytest.raises(ValueError, match=r"\(1, 9, 36, 144\).*\(1, 9, 36, 144, 576\)"):
        ScaleRouter.load(src, expected_scales=(1, 9, 36, 144, 576))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ScaleRouter.load(tmp_path / "nowhere")

    d = _copy(src, tmp_path / "a")
    (d / "router.json").unlink()
    with pytest.raises(FileNotFoundError, match="router.json"):
        ScaleRouter.load(d)

    d = _copy(src, tmp_path / "b")
    (d / "router.json").write_text("{not json")
    with pytest.raises(RouterFileError, match="router.json: not valid JSON"):
        ScaleRouter.load(d)

    d = _copy(src, tmp_path / "c")
    meta = json.loads((d / "router.json").read_text())
    del meta["feature_spec"]
    (d / "router.json").write_text(json.dumps(meta))
    with pytest.raises(RouterFileError, match="router.json: malformed.*feature_spec"):
        ScaleRouter.load(d)

    d = _copy(src, tmp_path / "d")
    (d / "model.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="model.onnx"):
        ScaleRouter.load(d)

    d = _copy(src, tmp_path / "e")
    (d / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(RouterFileError, match="model.onnx: contents do not match the sha256"):
        ScaleRouter.load(d)

    d = _copy(src, tmp_path / "f")
    (d / "model.onnx").write_bytes(b"garbage")
    meta = json.loads((d / "router.json").read_text())
    import hashlib

    meta["onnx"]["sha256"] = hashlib.sha256(b"garbage").hexdigest()
    (d / "router.json").write_text(json.dumps(meta))
    with pytest.raises(RouterFileError, match="model.onnx: not a valid ONNX model"):
        ScaleRouter.load(d)

    d = _copy(src, tmp_path / "g")
    meta = json.loads((d / "router.json").read_text())
    meta["scales"] = [1, 9, 36]
    (d / "router.json").write_text(json.dumps(meta))
    with pytest.raises(RouterFileError, match="model.onnx: output shape"):
        ScaleRouter.load(d)


def test_oracle_scale_classifier_baseline(data):
    d, tr, te, costs = data
    for est in ("logreg", "lightgbm"):
        clf = OracleScaleClassifier(est, d.scales, n_estimators=30).fit(d.X[tr], d.correct[tr])
        Pc = clf.predict_proba(d.X[te])
        np.testing.assert_allclose(Pc.sum(axis=1), 1.0, atol=1e-6)
        routed = clf.route(d.X[te])
        assert set(np.unique(routed)) <= set(d.scales)
        assert (clf.route(d.X[te], knob=1.01) == 144).all()
        curve = sweep("quantile", Pc, d.correct[te], d.scales, costs)
        assert min(p["mean_tokens"] for p in curve) == 1.0
    assert clf.get_params()["estimator"] == "lightgbm"
    with pytest.raises(ValueError, match="quantile"):
        clf.route(d.X[te], policy="threshold")


def test_select_router_cross_validates(data):
    d, tr, _, _ = data
    cands = [
        {"estimator": "logreg", "C": 0.01},
        {"estimator": "logreg", "C": 1.0},
        {"estimator": "lightgbm", **FAST["lightgbm"]},
    ]
    groups = np.arange(len(tr)) // 3  # three questions per image
    chosen = select_router(d.X[tr], d.correct[tr], d.scales, cands, cv=3, groups=groups)
    router, report = chosen.router, chosen.report
    json.dumps(report)
    assert report["splitter"] == "GroupKFold" and len(report["candidates"]) == 3
    means = [c["fold_log_loss_mean"] for c in report["candidates"]]
    lowest = int(np.argmin(means))
    bar = means[lowest] + report["candidates"][lowest]["fold_log_loss_se"]
    assert report["lowest_index"] == lowest
    assert report["best_index"] == min(i for i, m in enumerate(means) if m <= bar)
    assert router.get_params()["estimator"] == cands[report["best_index"]]["estimator"]
    plain = select_router(
        d.X[tr], d.correct[tr], d.scales, cands, cv=3, groups=groups, one_standard_error=False
    )
    assert plain.report["best_index"] == lowest
    twins = [{"estimator": "logreg", "C": 0.1}, {"estimator": "logreg", "C": 0.1001}]
    blind = [{"estimator": "logreg", "C": 1e-6}, {"estimator": "logreg", "C": 0.1}]
    for pair, pick in ((twins, 0), (blind, 1)):
        pair_report = select_router(d.X[tr], d.correct[tr], d.scales, pair, cv=3, groups=groups)
        assert pair_report.report["best_index"] == pick, pair_report.report["candidates"]
    # out-of-fold scores: each row predicted by a router fitted without its image's rows
    assert chosen.oof_proba.shape == d.correct[tr].shape and not hasattr(router, "oof_proba_")
    held_out = groups % 3 == 0
    assert report["candidates"][report["best_index"]]["log_loss"] == pytest.approx(
        scale_scores(d.correct[tr], chosen.oof_proba)["log_loss"]
    )
    in_sample = scale_scores(d.correct[tr][held_out], router.predict_proba(d.X[tr][held_out]))
    assert (
        in_sample["log_loss"]
        < scale_scores(d.correct[tr][held_out], chosen.oof_proba[held_out])["log_loss"]
    )
    assert all(len(c["per_scale_log_loss"]) == 4 for c in report["candidates"])
    with pytest.raises(ValueError, match="does not take"):
        select_router(d.X[tr], d.correct[tr], d.scales, [{"estimator": "mlp", "C": 1}], cv=2)


def test_predictor_imports_no_model_stack():
    code = (
        "import sys, predictor; "
        "[getattr(predictor, name) for name in predictor.__all__]; "  # every lazy name loaded
        "bad = [m for m in ('transformers', 'm3core', 'data', 'pipelines', 'torch') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_provider_choice_prefers_cuda_only_with_a_gpu(monkeypatch):
    import onnxruntime as ort

    from predictor import serving

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPU"])
    monkeypatch.setattr(serving, "_gpu_visible", lambda: True)
    assert serving.default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(serving, "_gpu_visible", lambda: False)
    assert serving.default_providers() == ["CPUExecutionProvider"]


def test_loaded_router_resaves_after_its_folder_is_gone(data, fitted, tmp_path):
    d, _, te, _ = data
    first = fitted["logreg"].save(tmp_path / "first")
    loaded = ScaleRouter.load(first, providers=["CPUExecutionProvider"])
    for f in first.iterdir():
        f.unlink()
    first.rmdir()
    again = ScaleRouter.load(loaded.save(tmp_path / "second"))
    np.testing.assert_array_equal(again.predict_proba(d.X[te]), loaded.predict_proba(d.X[te]))
