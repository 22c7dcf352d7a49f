"""Train a router on label shards and tune its knob (RouteLLM's router vs calibration split).

`fit_router`: cross-validated model choice on the calib labels (an image's questions stay in
one fold). `train_router` saves it as ONNX + JSON with the cross-validation report and the
winner's out-of-fold probabilities, so a later `tune_router` on the same split has held-out
scores. `tune_router`: pick the policy knob for a target (mean tokens, FLOPs, latency, or an
accuracy loss with a Learn-then-Test guarantee), store it in router.json, and store the
calibration table so call-time budgets need no labels.

The probe policies' folder (`ProbeRouter`) is built the same way from its parts: the gate is
the router above, and one router per probe scale is selected the same way on the router
features followed by that scale's probe features (`fit_probe_routers`, `train_probe_router`);
`tune_router` tunes its one knob on the parts' out-of-fold scores, after probe-cascade's gate
threshold is chosen from a fixed grid by gap closed on those scores.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.labels import LabelSet
from predictor import (
    CALIBRATION_JSON,
    GATE_THRESHOLDS,
    PROBE_POLICIES,
    ROUTER_POLICIES,
    ProbeRouter,
    ProbeScores,
    ScaleRouter,
    Selection,
    TuneResult,
    budgeted_oracle_curve,
    calibration_table,
    fixed_points,
    gap_closed,
    group_prior,
    load_calibration,
    oracle_point,
    save_calibration,
    select_router,
    sweep,
    tune,
    write_curve_report,
)
from predictor.drift import DRIFT_JSON, drift_reference, save_drift_reference
from predictor.routers.probe_router import GATE_DIR, PROBE_JSON, stage_dir

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


def calibration_scores(
    router: ScaleRouter,
    labels: LabelSet,
    router_dir: str | Path,
    features: np.ndarray | None = None,
) -> np.ndarray:
    """P(correct) to choose a knob on: held out from the router's fit, or the knob overfits.

    On the very split the router was fitted on, its own predictions are near perfect (the
    quickstart's router: ROC AUC 1.00 in-sample at telling which scale a sample needs, near
    chance on test; its report.json `diagnosis` holds both), so a knob chosen there is far too
    cheap and Learn-then-Test's guarantee is void.
    There the winner's out-of-fold probabilities from cross-validation, saved by
    `train_router`, stand in; on any other split, the router's predictions of `features`
    (default the labels' router features).
    """
    path = Path(router_dir) / OOF_JSON
    if path.is_file():
        oof = json.loads(path.read_text())
        if oof["ids"] == list(labels.ids):
            return np.asarray(oof["proba"], dtype=np.float64)
    return router.predict_proba(labels.features if features is None else features)


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
    router: ScaleRouter | ProbeRouter,
    labels: LabelSet,
    out_dir: str | Path,
    title: str,
    P: np.ndarray | ProbeScores | None = None,
) -> dict[str, Path]:
    """The curve report of a router on `labels`: every router policy on its gate (or its
    own) scores, a probe router's policy on its `ProbeScores`, and the confidence cascade."""
    gate = router.gate if isinstance(router, ProbeRouter) else router
    probe = P if isinstance(P, ProbeScores) else None
    curves = routing_curves(gate, labels, None if isinstance(P, ProbeScores) else P)
    if isinstance(router, ProbeRouter):
        curves = {k: v for k, v in curves.items() if not k.startswith("router/")}
        if probe is None:
            probes = {s: labels.probe_at(s) for s in router.probe_scales}
            probe = router.scores(labels.features, probes)
        policy = router.policy if router.policy != "fixed" else "probe-cascade"
        curves[policy] = sweep(policy, probe, labels.correct, labels.scales, labels.costs())
    return write_curve_report(
        out_dir,
        curves=curves,
        fixed_points=fixed_points(labels.correct, labels.scales, labels.costs()),
        oracle_point=oracle_point(labels.correct, labels.scales),
        budgeted_oracle=budgeted_oracle_curve(labels.correct, labels.tokens),
        title=title,
    )


def tune_router(
    labels: LabelSet,
    router_dir: str | Path,
    target: str | Mapping[str, object],
    policy: str | None = None,
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
    `policy` defaults to utility, or for a probe router folder to its own probe policy
    (`tune_probe_router`).
    """
    require_full(labels)
    if (Path(router_dir) / PROBE_JSON).is_file() or isinstance(router, ProbeRouter):
        return tune_probe_router(
            labels, router_dir, target, policy, router=router, uncertified=uncertified
        )
    policy = "utility" if policy is None else policy
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


# -- the probe policies' router folder --------------------------------------------------------


def stage_features(labels: LabelSet, scale: int) -> np.ndarray:
    """What the probe router of `scale` reads: the router features, then the probe."""
    return np.hstack([labels.features, labels.probe_at(scale)])


@dataclass
class ProbeSelection:
    """The gate's and every probe scale's `Selection` (refitted router, CV report, held-out
    scores)."""

    gate: Selection
    stages: dict[int, Selection]

    def router(self, policy: str, gate_threshold: float = 0.0) -> ProbeRouter:
        stages = {s: sel.router for s, sel in self.stages.items()}
        return ProbeRouter(self.gate.router, stages, policy, gate_threshold=gate_threshold)


def fit_probe_routers(
    labels: LabelSet,
    gate: Selection | None = None,
    candidates: list[dict] | None = None,
    cv: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> ProbeSelection:
    """`fit_router` for the gate (unless given) and for the router of each probe scale the
    labels hold, on the same folds; nothing is saved."""
    require_full(labels)
    for scale in labels.probe_scales or (labels.scales[0],):
        labels.probe_at(scale)  # a clear error before any fitting
    gate = gate or fit_router(labels, candidates, cv, seed, progress)
    _, groups = np.unique(np.asarray(labels.groups), return_inverse=True)
    names = list(labels.feature_names) + list(labels.probe_names or [])
    stages = {
        scale: select_router(
            stage_features(labels, scale),
            labels.correct,
            labels.scales,
            candidates=candidates,
            cv=cv,
            groups=groups,
            seed=seed,
            feature_names=names,
            progress=progress,
        )
        for scale in labels.probe_scales
    }
    return ProbeSelection(gate, stages)


def probe_scores(
    gate: np.ndarray, stages: dict[int, np.ndarray], scales: tuple[int, ...], threshold: float
) -> ProbeScores:
    """`ProbeScores` from per-part P arrays keyed by probe scale VALUE."""
    return ProbeScores({scales.index(s): P for s, P in stages.items()}, gate, threshold)


def gate_threshold_gaps(scores: ProbeScores, labels: LabelSet) -> dict[float, float]:
    """Gap closed on `labels` of probe-cascade at each of `GATE_THRESHOLDS` (its knob swept)."""
    costs = labels.costs()
    fixed = fixed_points(labels.correct, labels.scales, costs)
    budgeted = budgeted_oracle_curve(labels.correct, labels.tokens)
    gaps = {}
    for threshold in GATE_THRESHOLDS:
        curve = sweep(
            "probe-cascade", scores.with_threshold(threshold), labels.correct, labels.scales, costs
        )
        gaps[threshold] = gap_closed(curve, fixed, budgeted)
    return gaps


def train_probe_router(
    labels: LabelSet,
    out_dir: str | Path,
    policy: str,
    selection: ProbeSelection | None = None,
    cv: int = 5,
    seed: int = 0,
    progress: bool = False,
    save: bool = True,
) -> tuple[ProbeRouter, ProbeScores]:
    """Fit (unless `selection` is given) a probe router for `policy` and write each part's
    CV report and out-of-fold scores into its folder under `out_dir`; for probe-cascade the
    gate threshold is the one of `GATE_THRESHOLDS` whose gap closed on those scores is
    largest. Returns the router (saved untuned into `out_dir` unless `save` is False: a later
    `tune_probe_router` on the same split saves it with its knob) and the held-out
    `ProbeScores` as stored."""
    if policy not in PROBE_POLICIES:
        raise ValueError(f"a probe router serves {PROBE_POLICIES}, not {policy!r}")
    selection = selection or fit_probe_routers(labels, cv=cv, seed=seed, progress=progress)
    out = Path(out_dir)
    gate = write_selection(selection.gate, labels, out / GATE_DIR)
    stages = {
        s: write_selection(sel, labels, out / stage_dir(s)) for s, sel in selection.stages.items()
    }
    for stale in (CALIBRATION_JSON, DRIFT_JSON):
        (out / stale).unlink(missing_ok=True)
    scores = probe_scores(gate, stages, labels.scales, 0.0)
    threshold, report = 0.0, {}
    if policy == "probe-cascade":
        gaps = gate_threshold_gaps(scores, labels)
        threshold = max(gaps, key=lambda t: (gaps[t], -t))
        report = {"gate_threshold_gap_closed": {str(t): g for t, g in gaps.items()}}
    (out / CV_REPORT_JSON).write_text(
        json.dumps(
            {
                "gate": selection.gate.report["best_params"],
                "stages": {
                    str(s): sel.report["best_params"] for s, sel in selection.stages.items()
                },
                "gate_threshold": threshold,
                **report,
            },
            indent=1,
        )
    )
    router = selection.router(policy, threshold)
    if save:
        router.save(out)
    return router, scores.with_threshold(threshold)


def probe_calibration_scores(
    router: ProbeRouter, labels: LabelSet, router_dir: str | Path
) -> ProbeScores:
    """`calibration_scores` of every part: the out-of-fold scores stored beside it on the
    split it was fitted on, else its predictions."""
    folder = Path(router_dir)
    gate = calibration_scores(router.gate, labels, folder / GATE_DIR)
    stages = {
        scale: calibration_scores(
            part, labels, folder / stage_dir(scale), stage_features(labels, scale)
        )
        for scale, part in router.stages.items()
    }
    return probe_scores(gate, stages, labels.scales, router.gate_threshold)


def tune_probe_router(
    labels: LabelSet,
    router_dir: str | Path,
    target: str | Mapping[str, object],
    policy: str | None = None,
    *,
    router: ProbeRouter | None = None,
    scores: ProbeScores | None = None,
    uncertified: str = "largest",
) -> TuneResult:
    """`tune_router` for a probe router folder: the knob of its policy (or `policy`, the
    other probe policy) on the parts' held-out scores; writes probe.json, calibration.json
    and drift.json (the gate's features)."""
    if router is None:
        router = ProbeRouter.load(router_dir, expected_scales=labels.scales)
    if policy is None:
        policy = router.policy
        if policy == "fixed":  # an uncertified knob: the table says what it was tuned for
            table = load_calibration(router_dir)
            policy = None if table is None else str(table["policy"])
    if policy not in PROBE_POLICIES:
        raise ValueError(f"a probe router's knob is tuned for {PROBE_POLICIES}, not {policy!r}")
    if scores is None:
        scores = probe_calibration_scores(router, labels, router_dir)
    costs = labels.costs()
    result = tune(scores, labels.correct, labels.scales, costs, target, policy, uncertified)
    router.set_params(policy=result.policy, knob=result.knob)
    router.save(router_dir)
    table = calibration_table(scores, labels.correct, labels.scales, costs, policy)
    save_calibration(table, router_dir)
    reference = drift_reference(  # what `ProbeRouter.gate_route` gives, on held-out scores
        labels.features,
        labels.feature_names,
        labels.scales,
        scores.gate,
        "utility",
        router.knob,
        costs["tokens"],
        labels.confidence[:, 0],
    )
    save_drift_reference(reference, router_dir)
    return result
