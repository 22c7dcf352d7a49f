"""The main job: from a fresh clone to a routed, graded and timed run on the shipped tiny model.

It builds the synthetic benchmark's calib and test splits, labels both at every scale with Ray,
fits the router on calib by cross-validation and tunes its knob there for the accuracy-loss
target (`pipelines.routing`), and evaluates on test: every fixed scale, the oracle, the
budgeted oracle, the router over a sweep of its knob and at its no-loss point, and the
router-free confidence cascade. It then serves the test split through `AdaptiveLMM.generate()`
and at the largest and smallest scales, timed in the same run, grades the run against the
targets (`pipelines.report`) and writes report.json, report.md and pareto.png. Every step is
announced on the console.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm

from m3core.shipped import resolve_model
from pipelines.adaptive import AdaptiveLMM
from pipelines.labelling import LabelJob, run_labelling
from pipelines.labels import LabelSet, read_labels
from pipelines.report import (
    diagnosis,
    family_prior,
    grade,
    oracle_gain_by_family,
    parse_targets,
    quickstart_markdown,
    why_missed,
)
from pipelines.routing import fit_router, routing_curves, tune_router, write_selection
from pipelines.shards import RayOptions
from predictor import (
    ROUTER_POLICIES,
    ScaleRouter,
    budgeted_oracle_curve,
    evaluate_choice,
    fixed_points,
    gap_closed,
    oracle_point,
    write_curve_report,
)

NO_LOSS_DELTA = 0.1
"""The knob's accuracy-loss certificate may be wrong for at most one calib split in ten."""
STEPS = 8


@dataclass
class QuickstartConfig:
    """`targets` overrides `pipelines.report.DEFAULT_TARGETS` by name; its accuracy_loss is
    also the loss the knob is tuned for."""

    out: str = "runs/quickstart"
    model: str = "tiny-m3"
    calib_images: int = 1200
    test_images: int = 600
    seed: int = 0
    workers: int = 2
    policy: str = "utility"
    cv: int = 5
    serve_batch: int = 32
    targets: str | None = None


def step(number: int, text: str) -> None:
    print(f"[{number}/{STEPS}] {text}", flush=True)


def make_splits(config: QuickstartConfig, data: Path) -> None:
    """The benchmark's calib and test splits, or the ones already there if they match."""
    from data import make_benchmark
    from data.benchmark import MANIFEST

    sizes = {"calib": config.calib_images, "test": config.test_images}
    manifest = data / MANIFEST
    if manifest.is_file():
        stored = json.loads(manifest.read_text())
        if stored.get("sizes") != sizes or stored.get("seed") != config.seed:
            raise ValueError(
                f"{data.parent} holds a quickstart on {stored.get('sizes')} images (seed "
                f"{stored.get('seed')}), not {sizes} (seed {config.seed}); use a new --out folder"
            )
    if not (data / "test" / "dataset_info.json").is_file():
        make_benchmark(data, sizes, seed=config.seed)


def label_split(model: Path, data: Path, out: Path, workers: int) -> LabelSet:
    job = LabelJob(model=str(model), data=str(data), out=str(out), shard_size=100)
    run_labelling(job, RayOptions(workers=workers) if workers else None)
    return read_labels(out)


def served(model: AdaptiveLMM, images: list, questions: list[str], scale, batch: int) -> dict:
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


def choice_point(router: ScaleRouter, labels: LabelSet) -> dict:
    """The router at its own policy and knob on `labels`."""
    chosen = router.route(labels.features)
    idx = np.searchsorted(np.asarray(labels.scales), chosen)
    return {"knob": float(router.knob), **evaluate_choice(idx, labels.correct, labels.costs())}


def run_quickstart(config: QuickstartConfig) -> dict:
    targets = parse_targets(config.targets)
    loss = targets["accuracy_loss"]
    if not 0 < loss < 1:
        raise ValueError(f"the accuracy_loss target must lie in (0, 1), got {loss:g}")
    if config.policy not in ROUTER_POLICIES:
        raise ValueError(f"policy must be one of {ROUTER_POLICIES}, got {config.policy!r}")
    out = Path(config.out)
    model = resolve_model(config.model)

    step(1, f"benchmark: {config.calib_images} calib and {config.test_images} test images")
    make_splits(config, out / "data")
    step(2, "labelling the calib split at every scale")
    calib = label_split(model, out / "data" / "calib", out / "labels-calib", config.workers)
    step(3, "labelling the test split at every scale")
    test = label_split(model, out / "data" / "test", out / "labels-test", config.workers)

    step(4, f"router: cross-validating the candidates on calib ({config.cv} folds)")
    router_dir = out / "router"
    selection = fit_router(calib, cv=config.cv, seed=config.seed, progress=True)
    router = selection.router
    P_calib = write_selection(selection, calib, router_dir)  # also for a later `tune`
    step(5, f"knob: {config.policy} policy for an accuracy loss <= {loss:g} (calib, out of fold)")
    target = {"metric": "accuracy_loss", "epsilon": loss, "delta": NO_LOSS_DELTA}
    tuned = tune_router(
        calib, router_dir, target, config.policy, router=router, P=P_calib, uncertified="calib"
    )
    print(f"knob {tuned.knob:g} ({tuned.details['rule']}); router saved to {router_dir}")

    step(6, "evaluating on the test split: fixed scales, oracles, router and cascade")
    costs = test.costs()
    fixed = fixed_points(test.correct, test.scales, costs)
    oracle = oracle_point(test.correct, test.scales)
    budgeted = budgeted_oracle_curve(test.correct, test.tokens)
    P_test = router.predict_proba(test.features)
    curves = routing_curves(router, test, P_test, prior_from=calib)
    router_curve = curves[f"router/{config.policy}"]
    no_loss = choice_point(router, test)
    paths = write_curve_report(
        out / "curves",
        curves,
        fixed,
        oracle,
        budgeted,
        title="router vs fixed scales (test split)",
        png=out / "pareto.png",
    )

    step(7, "serving the test split: routed, then at the largest and the smallest scale")
    samples = datasets.load_from_disk(str(out / "labels-test" / "samples"))
    images, questions = samples["image"], samples["question"]
    serving = AdaptiveLMM.from_pretrained(model, router_dir)
    runs = {}
    for name, scale in tqdm(
        (("adaptive", "auto"), ("largest", test.scales[-1]), ("smallest", test.scales[0])),
        desc="serve",
        unit="run",
    ):
        runs[name] = served(serving, images, questions, scale, config.serve_batch)
    adaptive, largest_run, smallest_run = runs["adaptive"], runs["largest"], runs["smallest"]

    step(8, f"report: {out / 'report.json'}, report.md")
    largest = fixed[-1]["accuracy"]
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
            "knob_rule": tuned.details["rule"],
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
        "cv": {k: v for k, v in selection.report.items() if k != "candidates"},
        "curve_files": {k: str(v) for k, v in paths.items()},
    }
    report["targets"] = grade(report, targets)
    report["why_missed"] = why_missed(report)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "report.md").write_text(quickstart_markdown(report))
    return report


def _point(p: dict) -> dict:
    keys = ("knob", "accuracy", "mean_tokens", "mean_flops")
    return {k: float(p[k]) for k in keys if k in p and p[k] is not None}
