"""Train a router on label shards and tune its knob (RouteLLM's router vs calibration split).

`fit_router`: cross-validated model choice on the calib labels (an image's questions stay in
one fold). `train_router` saves it as ONNX + JSON with the cross-validation report and the
winner's out-of-fold probabilities, so a later `tune_router` on the same split has held-out
scores. `tune_router`: pick the policy knob for a target (mean tokens, FLOPs, latency, or an
accuracy loss with a Learn-then-Test guarantee), store it in router.json, and store the
calibration table so call-time budgets need no labels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipelines.labels import LabelSet
from predictor import (
    CALIBRATION_JSON,
    ROUTER_POLICIES,
    ScaleRouter,
    Selection,
    TuneResult,
    budgeted_oracle_curve,
    calibration_table,
    fixed_points,
    group_prior,
    oracle_point,
    save_calibration,
    select_router,
    sweep,
    tune,
    write_curve_report,
)
from predictor.drift import DRIFT_JSON, drift_reference, save_drift_reference

FAMILY_PRIOR = "family prior/utility"
OOF_JSON = "oof_proba.json"
CV_REPORT_JSON = "cv_report.json"


def require_full(labels: LabelSet) -> None:
    if not labels.observed.all():
        raise ValueError(
            "routers learn from the full correctness matrix: label this split with --mode full "
            f"({int((~labels.observed).sum())} sample-scale cells were never run)"
        )


def fit_router(
    labels: LabelSet,
    candidates: list[dict] | None = None,
    cv: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> Selection:
    """`select_router` on a labels folder's arrays, grouping folds by image; nothing is saved."""
    require_full(labels)
    _, groups = np.unique(np.asarray(labels.groups), return_inverse=True)
    return select_router(
        labels.features,
        labels.correct,
        labels.scales,
        candidates=candidates,
        cv=cv,
        groups=groups,
        seed=seed,
        feature_names=labels.feature_names,
        progress=progress,
    )


def write_selection(selection: Selection, labels: LabelSet, out_dir: str | Path) -> np.ndarray:
    """The cross-validation report and the out-of-fold scores, beside the router: what a
    later `tune_router` on this split reads as held-out scores. Drops a calibration table,
    which described the previous router. Returns the scores as stored (6 decimals), so a
    knob chosen on them in memory is the one `adaptive-m3 tune` would choose from the file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (CALIBRATION_JSON, DRIFT_JSON):  # they described the previous router
        (out / stale).unlink(missing_ok=True)
    (out / CV_REPORT_JSON).write_text(json.dumps(selection.report, indent=1))
    stored = selection.oof_proba.round(6)
    (out / OOF_JSON).write_text(json.dumps({"ids": labels.ids, "proba": stored.tolist()}))
    return stored


def train_router(
    labels: LabelSet,
    out_dir: str | Path,
    candidates: list[dict] | None = None,
    cv: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> Selection:
    """`fit_router`, then the router and `write_selection` into `out_dir`."""
    selection = fit_router(labels, candidates, cv, seed, progress)
    selection.router.save(out_dir)
    write_selection(selection, labels, out_dir)
    return selection


def calibration_scores(router: ScaleRouter, labels: LabelSet, router_dir: str | Path) -> np.ndarray:
    """P(correct) to choose a knob on: held out from the router's fit, or the knob overfits.

    On the very split the router was fitted on, its own predictions are near perfect (the
    quickstart's router: ROC AUC 1.00 in-sample at telling which scale a sample needs, near
    chance on test; its report.json `diagnosis` holds both), so a knob chosen there is far too
    cheap and Learn-then-Test's guarantee is void.
    There the winner's out-of-fold probabilities from cross-validation, saved by
    `train_router`, stand in; on any other split, the router's predictions.
    """
    path = Path(router_dir) / OOF_JSON
    if path.is_file():
        oof = json.loads(path.read_text())
        if oof["ids"] == list(labels.ids):
            return np.asarray(oof["proba"], dtype=np.float64)
    return router.predict_proba(labels.features)


def routing_curves(
    router: ScaleRouter,
    labels: LabelSet,
    P: np.ndarray | None = None,
    prior_from: LabelSet | None = None,
) -> dict[str, list[dict]]:
    """Knob sweeps of every router policy (on `P`, default the router's predictions), and the
    router-free confidence cascade.

    With `prior_from` (the split the router was fitted on) and known families, also the
    family-prior baseline: each question family's accuracy per scale on that split as P, so
    every question of a family goes to one scale. A router above it reads more than the
    question type.
    """
    P = router.predict_proba(labels.features) if P is None else P
    costs = labels.costs()
    curves = {
        f"router/{policy}": sweep(policy, P, labels.correct, labels.scales, costs)
        for policy in ROUTER_POLICIES
    }
    curves["cascade"] = sweep("cascade", labels.confidence, labels.correct, labels.scales, costs)
    if prior_from is not None and prior_from.has_families:
        curves[FAMILY_PRIOR] = group_prior_curve(
            prior_from, prior_from.families, labels, labels.families
        )
    return curves


def group_prior_curve(
    fit: LabelSet, fit_groups: Sequence[str], labels: LabelSet, groups: Sequence[str]
) -> list[dict]:
    """The utility sweep on `labels` over `group_prior`: every sample of a group at one scale,
    chosen from the group's accuracy per scale on `fit`."""
    prior = group_prior(fit.correct, fit_groups, groups)
    return sweep("utility", prior, labels.correct, labels.scales, labels.costs())


def write_routing_report(
    router: ScaleRouter,
    labels: LabelSet,
    out_dir: str | Path,
    title: str,
    P: np.ndarray | None = None,
) -> dict[str, Path]:
    return write_curve_report(
        out_dir,
        curves=routing_curves(router, labels, P),
        fixed_points=fixed_points(labels.correct, labels.scales, labels.costs()),
        oracle_point=oracle_point(labels.correct, labels.scales),
        budgeted_oracle=budgeted_oracle_curve(labels.correct, labels.tokens),
        title=title,
    )


def tune_router(
    labels: LabelSet,
    router_dir: str | Path,
    target: str | Mapping[str, object],
    policy: str = "utility",
    *,
    router: ScaleRouter | None = None,
    P: np.ndarray | None = None,
    uncertified: str = "largest",
) -> TuneResult:
    """Choose the knob on `labels` (the calib split) and store it with the router.

    `router` defaults to the one saved in `router_dir` and `P` to `calibration_scores`;
    pass them when they are in memory (a router fresh from `fit_router` and its
    out-of-fold scores). Writes router.json / model.onnx and calibration.json.
    `uncertified` is `tune_to_accuracy_loss`'s rule for an accuracy loss nothing certifies.
    """
    require_full(labels)
    if policy not in ROUTER_POLICIES:
        raise ValueError(f"a router's knob is tuned for {ROUTER_POLICIES}, not {policy!r}")
    if router is None:
        router = ScaleRouter.load(router_dir, expected_scales=labels.scales)
    if P is None:
        P = calibration_scores(router, labels, router_dir)
    costs = labels.costs()
    result = tune(P, labels.correct, labels.scales, costs, target, policy, uncertified)
    router.set_params(policy=result.policy, knob=result.knob)
    router.save(router_dir)
    save_calibration(calibration_table(P, labels.correct, labels.scales, costs, policy), router_dir)
    reference = drift_reference(
        labels.features,
        labels.feature_names,
        labels.scales,
        P,
        result.policy,
        result.knob,
        costs["tokens"],
        labels.confidence[:, 0],
    )
    save_drift_reference(reference, router_dir)  # what AdaptiveLMM compares traffic with
    return result
