"""The main job: from a fresh clone to the oracle gap closed, on the shipped tiny model.

Steps: make the synthetic calib and test splits; label both at every scale (Ray); train the
router on calib and calibrate it; evaluate on test (every fixed scale, the oracle, the budgeted
oracle, the router over a knob sweep and at its no-loss point, the confidence cascade); serve the
test split through `AdaptiveLMM.generate()` and at the largest scale, timed in the same run.
Writes report.json, report.md and pareto.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from sklearn.metrics import roc_auc_score

from m3core.shipped import resolve_model
from pipelines.adaptive import AdaptiveLMM
from pipelines.labelling import LabelJob, run_labelling
from pipelines.labels import LabelSet, read_labels
from pipelines.routing import (
    FAMILY_PRIOR,
    calibration_scores,
    group_prior_curve,
    routing_curves,
    train_router,
)
from pipelines.shards import RayOptions
from predictor import (
    ScaleRouter,
    budgeted_oracle_curve,
    calibration_table,
    evaluate_choice,
    fixed_points,
    gap_closed,
    no_loss_point,
    oracle_point,
    save_calibration,
    tune_to_accuracy_loss,
    write_curve_report,
)

NO_LOSS_TOLERANCE = 0.01  # issue 7's "within 1 point": the certified loss and the target check
NO_LOSS_DELTA = 0.1  # the certificate may be wrong for at most one calib split in ten
# The most accurate knob of each policy: utility without a cost weight; a threshold that no
# scale below the largest passes.
SAFE_KNOB = {"utility": 0.0, "threshold": 1.0}


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"
    model: str = "tiny-m3"
    calib_images: int = 1200
    test_images: int = 600
    seed: int = 0
    workers: int = 2
    policy: str = "utility"
    cv: int = 5
    serve_batch: int = 32


def label_split(model: Path, data: Path, out: Path, workers: int) -> LabelSet:
    job = LabelJob(model=str(model), data=str(data), out=str(out), shard_size=100)
    run_labelling(job, RayOptions(workers=workers) if workers else None)
    return read_labels(out)


def no_loss_knob(
    router: ScaleRouter, calib: LabelSet, policy: str, P: np.ndarray
) -> tuple[float | None, str]:
    """The no-loss knob from held-out calib scores `P`, and the rule that found it.

    "certified": the cheapest knob that Learn-then-Test certifies to lose at most 1 point
    against the largest scale on new data (probability >= 0.9), since the target is about
    new data. Empirical rules did not carry: the cheapest knob without calib loss lost 1.2
    points on test with the 27-stage tiny-m3, knobs at the 1-point edge 0.9-1.5 with older
    ones. Where nothing is certified (a small calib split), "calib": the cheapest knob
    without calib loss, else the cheapest within 1 point; else (None, "none")."""
    certified = tune_to_accuracy_loss(
        P, calib.correct, calib.scales, NO_LOSS_TOLERANCE, NO_LOSS_DELTA, policy, calib.costs()
    )
    if certified.certified:
        return certified.knob, "certified"
    curve = routing_curves(router, calib, P)[f"router/{policy}"]
    largest = float(calib.correct[:, -1].mean())
    for tol in (0.0, NO_LOSS_TOLERANCE):
        point = no_loss_point(curve, largest, tol=tol)
        if point is not None:
            return float(point["knob"]), "calib"
    return None, "none"


def served(model, images: list, questions: list[str], scale, batch: int) -> dict:
    """Answer the whole test split once; throughput includes encoding and routing."""
    model.generate(images[:batch], questions[:batch], scale=scale, batch_size=batch)  # warm-up
    started = time.perf_counter()
    records = model.generate(images, questions, scale=scale, batch_size=batch)
    elapsed = time.perf_counter() - started
    return {
        "samples_per_s": len(records) / elapsed,
        "mean_visual_tokens": float(np.mean([r.visual_tokens for r in records])),
        "route_share": float(model.last_timing.get("route_share", 0.0)),
        "route_s": float(model.last_timing.get("route_s", 0.0)),
        "seconds": elapsed,
    }


def choice_point(router: ScaleRouter, labels: LabelSet, knob: float, policy: str) -> dict:
    chosen = router.route(labels.features, knob=knob, policy=policy)
    idx = np.searchsorted(np.asarray(labels.scales), chosen)
    return {"knob": knob, **evaluate_choice(idx, labels.correct, labels.costs())}


def run_quickstart(config: QuickstartConfig) -> dict:
    from data import make_benchmark
    from data.benchmark import MANIFEST

    out = Path(config.out)
    model = resolve_model(config.model)
    data = out / "data"
    sizes = {"calib": config.calib_images, "test": config.test_images}
    manifest = data / MANIFEST
    if manifest.is_file():
        stored = json.loads(manifest.read_text())
        if stored.get("sizes") != sizes or stored.get("seed") != config.seed:
            raise ValueError(
                f"{out} holds a quickstart on {stored.get('sizes')} images (seed "
                f"{stored.get('seed')}), not {sizes} (seed {config.seed}); use a new --out folder"
            )
    if not (data / "test" / "dataset_info.json").is_file():
        make_benchmark(data, sizes, seed=config.seed)
    calib = label_split(model, data / "calib", out / "labels-calib", config.workers)
    test = label_split(model, data / "test", out / "labels-test", config.workers)

    router_dir = out / "router"
    router, cv_report = train_router(calib, router_dir, cv=config.cv, seed=config.seed)
    P_calib = calibration_scores(router, calib, router_dir)
    knob, knob_rule = no_loss_knob(router, calib, config.policy, P_calib)
    router.set_params(
        policy=config.policy, knob=knob if knob is not None else SAFE_KNOB[config.policy]
    )
    router.save(router_dir)
    table = calibration_table(P_calib, calib.correct, calib.scales, calib.costs(), config.policy)
    save_calibration(table, router_dir)  # call-time budgets: AdaptiveLMM.generate(budget=...)

    costs = test.costs()
    fixed = fixed_points(test.correct, test.scales, costs)
    oracle = oracle_point(test.correct, test.scales)
    budgeted = budgeted_oracle_curve(test.correct, test.tokens)
    P_test = router.predict_proba(test.features)
    curves = routing_curves(router, test, P_test, prior_from=calib)
    router_curve = curves[f"router/{config.policy}"]
    largest = fixed[-1]["accuracy"]
    no_loss = choice_point(router, test, router.knob, config.policy)
    paths = write_curve_report(
        out / "curves", curves, fixed, oracle, budgeted, title="router vs fixed scales (test split)"
    )

    samples = datasets.load_from_disk(str(out / "labels-test" / "samples"))
    images, questions = samples["image"], samples["question"]
    serving = AdaptiveLMM.from_pretrained(model, router_dir)
    adaptive = served(serving, images, questions, "auto", config.serve_batch)
    largest_run = served(serving, images, questions, test.scales[-1], config.serve_batch)
    smallest_run = served(serving, images, questions, test.scales[0], config.serve_batch)
    report = {
        "model": str(model),
        "samples": {"calib": len(calib), "test": len(test)},
        "scales": list(test.scales),
        "fixed": {
            str(p["scale"]): {
                "accuracy": p["accuracy"],
                "mean_tokens": p["mean_tokens"],
                "mean_flops": p["mean_flops"],
            }
            for p in fixed
        },
        "oracle": {"accuracy": oracle[0], "mean_tokens": oracle[1]},
        "budgeted_oracle": [list(p) for p in budgeted],
        "router": [_point(p) for p in router_curve],
        "router_estimator": router.estimator,
        "policy": config.policy,
        "no_loss_point": {
            **_point(no_loss),
            "largest_scale_accuracy": largest,
            "token_fraction": no_loss["mean_tokens"] / test.scales[-1],
            "knob_rule": knob_rule,
        },
        "gap_closed": gap_closed(router_curve, fixed, budgeted),
        "cascade": [_point(p) for p in curves["cascade"]],
        "cascade_gap_closed": gap_closed(curves["cascade"], fixed, budgeted),
        "family_prior": family_prior(curves, test, fixed, budgeted),
        "oracle_gain_by_family": oracle_gain_by_family(test),
        "timing": {
            "adaptive_samples_per_s": adaptive["samples_per_s"],
            "largest_scale_samples_per_s": largest_run["samples_per_s"],
            "speedup": adaptive["samples_per_s"] / largest_run["samples_per_s"],
            "router_overhead_fraction": adaptive["route_share"],
            "adaptive_mean_visual_tokens": adaptive["mean_visual_tokens"],
            "route_ms_per_sample": 1e3 * adaptive["route_s"] / len(images),
            "smallest_scale_ms_per_sample": 1e3 * smallest_run["seconds"] / len(images),
            "smallest_scale_speedup": smallest_run["samples_per_s"] / largest_run["samples_per_s"],
        },
        "diagnosis": {
            "test": diagnosis(P_test, test),
            "calib": diagnosis(router.predict_proba(calib.features), calib),
        },
        "cv": {k: v for k, v in cv_report.items() if k != "candidates"},
        "curve_files": {k: str(v) for k, v in paths.items()},
    }
    report["targets"] = targets(report)
    report["why_missed"] = why_missed(report)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "report.md").write_text(markdown(report))
    (out / "pareto.png").write_bytes(Path(paths["png"]).read_bytes())
    return report


def _point(p: dict) -> dict:
    keys = ("knob", "accuracy", "mean_tokens", "mean_flops")
    return {k: float(p[k]) for k in keys if k in p and p[k] is not None}


def targets(report: dict) -> dict:
    """The issue's targets, each with its measured value and whether it is met."""
    nl = report["no_loss_point"]
    timing = report["timing"]
    return {
        "no_loss_within_1pt": [
            nl["accuracy"] >= nl["largest_scale_accuracy"] - NO_LOSS_TOLERANCE,
            nl["accuracy"] - nl["largest_scale_accuracy"],
        ],
        "no_loss_tokens_at_most_30pct": [nl["token_fraction"] <= 0.30, nl["token_fraction"]],
        "gap_closed_at_least_0.5": [report["gap_closed"] >= 0.5, report["gap_closed"]],
        "speedup_at_least_2x": [timing["speedup"] >= 2.0, timing["speedup"]],
        "router_overhead_at_most_1pct": [
            timing["router_overhead_fraction"] <= 0.01,
            timing["router_overhead_fraction"],
        ],
    }


def family_prior(curves: dict, test: LabelSet, fixed: list[dict], budgeted: list) -> dict | None:
    """gap_closed of routing by question family alone: the share the question type explains.

    `gap_closed` fits each family's scale on calib (the `FAMILY_PRIOR` curve);
    `hindsight_gap_closed` fits it on test itself, the most any question-type router can do.
    None without families.
    """
    if FAMILY_PRIOR not in curves:
        return None
    hindsight = group_prior_curve(test, test.families, test, test.families)
    return {
        "gap_closed": gap_closed(curves[FAMILY_PRIOR], fixed, budgeted),
        "hindsight_gap_closed": gap_closed(hindsight, fixed, budgeted),
    }


def oracle_gain_by_family(labels: LabelSet) -> list[dict] | None:
    """Where the oracle's gain over the largest scale comes from, largest share first.

    Per family: `share` of the samples right at some scale but wrong at the largest, the
    family's `samples` fraction and its `largest_accuracy`. None without families.
    """
    if not labels.has_families:
        return None
    families = np.asarray(labels.families)
    correct = labels.correct.astype(bool)
    gained = correct.any(axis=1) & ~correct[:, -1]
    rows = [
        {
            "family": str(family),
            "share": float(gained[families == family].sum() / max(gained.sum(), 1)),
            "samples": float(np.mean(families == family)),
            "largest_accuracy": float(correct[families == family, -1].mean()),
        }
        for family in np.unique(families)
    ]
    return sorted(rows, key=lambda row: -row["share"])


def diagnosis(proba: np.ndarray, labels: LabelSet) -> dict:
    """How far the router can tell which scale a sample needs: the bound on the oracle gap.

    `router_auc`: ROC AUC of P(correct at s) per scale (0.5 = no signal). `choice_auc`: per
    larger scale s, over the samples where s and the smallest scale disagree, ROC AUC of
    P_s - P_smallest for "s is the right one"; those samples are the oracle's whole gain, so
    this is what routing needs. `flip_rate`: samples right at some scale, wrong at a larger one.
    `proba` is the router's (n, S) P(correct) on `labels`.
    """
    correct = labels.correct.astype(bool)
    router_auc, choice_auc = {}, {}
    for j, scale in enumerate(labels.scales):
        router_auc[str(scale)] = _auc(correct[:, j], proba[:, j])
        if j:
            differ = correct[:, j] != correct[:, 0]
            choice_auc[str(scale)] = _auc(correct[differ, j], proba[differ, j] - proba[differ, 0])
    right_before = np.logical_or.accumulate(correct, axis=1)[:, :-1]
    flips = (right_before & ~correct[:, 1:]).any(axis=1)
    return {"router_auc": router_auc, "choice_auc": choice_auc, "flip_rate": float(flips.mean())}


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    return float(roc_auc_score(y, score)) if y.size and 0 < y.mean() < 1 else None


def _span(values: dict, fmt: str = ".2f") -> str:
    known = [v for v in values.values() if v is not None]
    if not known:
        return "n/a"
    low, high = f"{min(known):{fmt}}", f"{max(known):{fmt}}"
    return low if low == high else f"{low}-{high}"


def _luck(gain_by_family: list[dict] | None) -> str:
    """The fewest families that carry half the oracle's gain over the largest scale ("" if
    unknown)."""
    if not gain_by_family or gain_by_family[0]["share"] == 0:
        return ""
    top, share = [], 0.0
    for row in gain_by_family:
        top.append(row)
        share += row["share"]
        if share >= 0.5:
            break
    names = [row["family"].replace("_", " ") for row in top]
    listed = f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]
    accuracy = {row["family"]: 100 * row["largest_accuracy"] for row in top}
    return (
        f"; {100 * share:.0f} % of that gain comes from {listed} "
        f"({100 * sum(row['samples'] for row in top):.0f} % of the samples, "
        f"{_span(accuracy, '.0f')} % right at the largest scale)"
        + (
            "; the model half-guesses there, so which scale is right is luck"
            if max(accuracy.values()) < 80
            else ""
        )
    )


def why_missed(report: dict) -> dict[str, str]:
    """One measured reason per missed target, for report.md and the README."""
    met = {name: ok for name, (ok, _) in report["targets"].items()}
    test, calib = report["diagnosis"]["test"], report["diagnosis"]["calib"]
    t, nl = report["timing"], report["no_loss_point"]
    gain = report["oracle"]["accuracy"] - nl["largest_scale_accuracy"]
    fp = report.get("family_prior")
    by_family = (
        ""
        if fp is None
        else "sending each question family to the scale that suits it closes "
        f"{fp['gap_closed']:.3f} (fitted on calib; {fp['hindsight_gap_closed']:.3f} fitted on "
        f"test in hindsight) against the router's {report['gap_closed']:.3f}, "
        + (
            "so the question type alone cannot reach 0.5 and the rest must come from the image; "
            if fp["hindsight_gap_closed"] < 0.5
            else "so the router misses part of what the question type alone gives; "
        )
    )
    predictability = by_family + (
        f"the router predicts whether an answer is right (ROC AUC {_span(test['router_auc'])} "
        "on test, mostly from the question) but not which scale a sample needs: where the "
        f"smallest scale and a larger one disagree, its AUC at picking the right one is "
        f"{_span(test['choice_auc'])} on test (0.5 = chance) against "
        f"{_span(calib['choice_auc'])} on the calib split it was fitted on. Those "
        f"disagreements ({100 * test['flip_rate']:.0f} % of samples flip from right to wrong "
        f"as the scale grows) are the oracle's whole {100 * gain:.1f}-point gain over the "
        "largest scale" + _luck(report.get("oracle_gain_by_family"))
    )
    cannot_pick = (
        "the router cannot tell which samples need a larger scale (ROC AUC "
        f"{_span(test['choice_auc'])} on test at picking the right one of two disagreeing scales)"
    )
    reasons = {
        "no_loss_within_1pt": cannot_pick,
        "gap_closed_at_least_0.5": predictability,
        "no_loss_tokens_at_most_30pct": (
            f"staying within 1 point costs {nl['mean_tokens']:.1f} mean visual tokens: "
            + cannot_pick
        ),
        "speedup_at_least_2x": (
            f"the adaptive run averages {t['adaptive_mean_visual_tokens']:.1f} visual tokens to "
            "stay within 1 point: " + cannot_pick
            if t["smallest_scale_speedup"] >= 2.0
            else f"answering every sample at the smallest scale serves only "
            f"{t['smallest_scale_speedup']:.2f}x the largest scale's samples/s on this model "
            f"(its largest scale is {report['scales'][-1]} tokens, and per-sample costs that do "
            "not shrink with the tokens dominate), so no routing reaches 2x here"
        ),
        "router_overhead_at_most_1pct": (
            f"features + router take {t['route_ms_per_sample']:.3f} ms per sample, mostly fixed "
            f"per-call costs, against {t['smallest_scale_ms_per_sample']:.2f} ms for a "
            "smallest-scale answer of this tiny model; 1 % holds for any model whose "
            f"smallest-scale answer takes {100 * t['route_ms_per_sample']:.0f} ms per sample "
            "or more"
        ),
    }
    return {name: reasons[name] for name, ok in met.items() if not ok}


def markdown(report: dict) -> str:
    lines = [
        "# adaptive-m3 quickstart (test split)",
        "",
        "| point | accuracy | mean visual tokens |",
        "|---|---|---|",
    ]
    for scale, p in report["fixed"].items():
        lines.append(f"| fixed {scale} | {100 * p['accuracy']:.1f} | {p['mean_tokens']:.1f} |")
    o, nl = report["oracle"], report["no_loss_point"]
    lines.append(f"| oracle | {100 * o['accuracy']:.1f} | {o['mean_tokens']:.1f} |")
    lines.append(
        f"| router at no-loss knob ({report['policy']}, {nl['knob_rule']}) | "
        f"{100 * nl['accuracy']:.1f} | "
        f"{nl['mean_tokens']:.1f} |"
    )
    t = report["timing"]
    lines += [
        "",
        f"gap_closed: {report['gap_closed']:.3f} (confidence cascade: "
        f"{report['cascade_gap_closed']:.3f}"
        + (
            ""
            if report.get("family_prior") is None
            else f"; routing by question family: {report['family_prior']['gap_closed']:.3f}"
        )
        + ")",
        f"no-loss point uses {100 * nl['token_fraction']:.1f} % of the largest scale's tokens"
        + (
            ""
            if nl["knob_rule"] != "none"
            else " (no knob kept calib within 1 point, so the router runs at its most accurate"
            f" knob, {nl['knob']:g})"
        ),
        f"serving: adaptive {t['adaptive_samples_per_s']:.1f} samples/s vs largest scale "
        f"{t['largest_scale_samples_per_s']:.1f} samples/s (x{t['speedup']:.2f}); router "
        f"overhead {100 * t['router_overhead_fraction']:.2f} % of the adaptive run",
        "",
        "| target | met | measured |",
        "|---|---|---|",
    ]
    for name, (met, value) in report["targets"].items():
        lines.append(f"| {name} | {'yes' if met else 'NO'} | {value:.3f} |")
    if report["why_missed"]:
        lines += ["", "Why the missed targets are missed (measured in this run):", ""]
        reasons: dict[str, list[str]] = {}
        for name, why in report["why_missed"].items():
            reasons.setdefault(why, []).append(name)
        lines += [f"- {', '.join(names)}: {why}" for why, names in reasons.items()]
    return "\n".join(lines) + "\n"
