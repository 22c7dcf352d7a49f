"""The main job: from a fresh clone to a routed, graded and timed run on the shipped tiny model.

It builds the synthetic benchmark's calib and test splits and a second test split from another
generator seed, labels all three at every scale with Ray (the probe features and the gold
answer's probability come with the labels), and fits three routers on calib by
cross-validation, each with its knob tuned there for the accuracy-loss target
(`pipelines.routing`): the router on the free features (utility or threshold policy), and the
probe router folder twice, for the `probe` and `probe-cascade` policies. The default is the one
whose gap closed on calib's out-of-fold scores is largest. On each test split it evaluates every
fixed scale, the papers' oracle and the chance-corrected oracle A, the budgeted oracles, every
router over a sweep of its knob and at its tuned knob, routing by question family and the
router-free confidence cascade; it serves the split through `AdaptiveLMM.generate()` with each
router and at the largest and smallest scales, timed in the same run; and grades the default
against the targets (`pipelines.report`). It writes report.json, report.md and pareto.png (and
pareto-extra.png). Every step is announced on the console.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm

from m3core import NestedLMM
from m3core.shipped import resolve_model
from pipelines.adaptive import AdaptiveLMM
from pipelines.labelling import LabelJob, run_labelling
from pipelines.labels import LabelSet, read_labels
from pipelines.report import (
    diagnosis,
    family_prior,
    luck,
    oracle_gain_by_family,
    quickstart_markdown,
    why_missed,
)
from pipelines.routing import (
    FAMILY_PRIOR,
    ProbeSelection,
    fit_probe_routers,
    fit_router,
    routing_curves,
    train_probe_router,
    tune_probe_router,
    tune_router,
    write_selection,
)
from pipelines.shards import RayOptions
from pipelines.targets import grade, parse_targets
from predictor import (
    PROBE_POLICIES,
    ROUTER_POLICIES,
    ProbeRouter,
    ProbeScores,
    ScaleRouter,
    budgeted_oracle_curve,
    chance_corrected,
    evaluate_choice,
    fixed_points,
    gap_closed,
    oracle_point,
    sweep,
    write_curve_report,
)

NO_LOSS_DELTA = 0.1
"""The knob's accuracy-loss certificate may be wrong for at most one calib split in ten."""
STEPS = 8
ROUTER = "router"
"""The router on the free features; the probe routers are named by their policy."""


@dataclass
class QuickstartConfig:
    """`targets` overrides `pipelines.targets.DEFAULT_TARGETS` by name; its accuracy_loss is
    also the loss every knob is tuned for. `extra_test_seed` (None: none) is the generator seed
    of the second test split; `probe` False leaves the probe routers out."""

    out: str = "runs/quickstart"
    model: str = "tiny-m3"
    calib_images: int = 1200
    test_images: int = 600
    seed: int = 0
    extra_test_seed: int | None = 1
    workers: int = 2
    policy: str = "utility"
    cv: int = 5
    serve_batch: int = 32
    targets: str | None = None
    probe: bool = True


def step(number: int, text: str) -> None:
    print(f"[{number}/{STEPS}] {text}", flush=True)


def make_splits(data: Path, sizes: dict[str, int], seed: int) -> None:
    """The benchmark's splits of `sizes`, or the ones already there if they match."""
    from data import make_benchmark
    from data.benchmark import MANIFEST

    manifest = data / MANIFEST
    if manifest.is_file():
        stored = json.loads(manifest.read_text())
        if stored.get("sizes") != sizes or stored.get("seed") != seed:
            raise ValueError(
                f"{data.parent} holds a quickstart on {stored.get('sizes')} images (seed "
                f"{stored.get('seed')}), not {sizes} (seed {seed}); use a new --out folder"
            )
    if not all((data / split / "dataset_info.json").is_file() for split in sizes):
        make_benchmark(data, sizes, seed=seed)


def label_split(model: Path, data: Path, out: Path, workers: int) -> LabelSet:
    job = LabelJob(model=str(model), data=str(data), out=str(out), shard_size=100)
    run_labelling(job, RayOptions(workers=workers) if workers else None)
    return read_labels(out)


def served(model: AdaptiveLMM, images: list, questions: list[str], scale, batch: int) -> dict:
    """Answer the whole split once; throughput includes encoding and routing."""
    model.generate(images[:batch], questions[:batch], scale=scale, batch_size=batch)  # warm-up
    started = time.perf_counter()
    records = model.generate(images, questions, scale=scale, batch_size=batch)
    elapsed = time.perf_counter() - started
    attempts = np.asarray([len(r.tried_scales) for r in records])
    return {
        "samples_per_s": len(records) / elapsed,
        "mean_visual_tokens": float(np.mean([r.visual_tokens for r in records])),
        "route_share": float(model.last_timing.get("route_share", 0.0)),
        "route_s": float(model.last_timing.get("route_s", 0.0)),
        "probe_prefill_share": float(
            model.last_timing.get("probe_prefill_s", 0.0) / model.last_timing["total_s"]
        ),
        "seconds": elapsed,
        "mean_attempts": float(attempts.mean()),
        "repeated_share": float((attempts > 1).mean()),
    }


@dataclass
class Routers:
    """The routers the quickstart offers, by name, and what scores each on a split."""

    router: ScaleRouter
    probe: dict[str, ProbeRouter]

    @property
    def names(self) -> list[str]:
        return [ROUTER, *self.probe]

    def policy(self, name: str) -> str:
        return self.router.policy if name == ROUTER else self.probe[name].policy

    def scores(self, name: str, labels: LabelSet) -> np.ndarray | ProbeScores:
        if name == ROUTER:
            return self.router.predict_proba(labels.features)
        router = self.probe[name]
        probes = {s: labels.probe_at(s) for s in router.probe_scales}
        return router.scores(labels.features, probes)

    def curve_policy(self, name: str, config: QuickstartConfig) -> str:
        return config.policy if name == ROUTER else name

    def choice(self, name: str, labels: LabelSet) -> dict:
        """The router at its own policy and knob on `labels`, every prefill paid."""
        costs = labels.costs()
        if name == ROUTER:
            chosen, paid = self.router.route(labels.features, costs=costs), None
            knob = self.router.knob
        else:
            router = self.probe[name]
            probes = {s: labels.probe_at(s) for s in router.probe_scales}
            if router.policy == "fixed":
                chosen = np.full(len(labels), int(router.knob))
                paid = None
            else:
                chosen, paid = router.route(labels.features, probes, costs=costs["tokens"])
            knob = router.knob
        idx = np.searchsorted(np.asarray(labels.scales), chosen)
        return {"knob": float(knob), **evaluate_choice(idx, labels.correct, costs, paid)}


def fit_and_tune(
    config: QuickstartConfig, calib: LabelSet, out: Path, loss: float
) -> tuple[Routers, dict, dict]:
    """Steps 4 and 5: every router fitted on calib, tuned there, saved under routers/.
    Returns the routers, their calib summaries and the router's CV report."""
    target = {"metric": "accuracy_loss", "epsilon": loss, "delta": NO_LOSS_DELTA}
    folders = out / "routers"
    step(4, f"routers: cross-validating the candidates on calib ({config.cv} folds)")
    selection = fit_router(calib, cv=config.cv, seed=config.seed, progress=True)
    P_calib = write_selection(selection, calib, folders / ROUTER)  # also for a later `tune`
    probe_selection: ProbeSelection | None = None
    if config.probe and calib.probe:
        probe_selection = fit_probe_routers(
            calib, gate=selection, cv=config.cv, seed=config.seed, progress=True
        )
    step(5, f"knobs: each router for an accuracy loss <= {loss:g} (calib, out of fold)")
    tuned = tune_router(
        calib,
        folders / ROUTER,
        target,
        config.policy,
        router=selection.router,
        P=P_calib,
        uncertified="calib",
    )
    costs, fixed = calib.costs(), fixed_points(calib.correct, calib.scales, calib.costs())
    budgeted = budgeted_oracle_curve(calib.correct, calib.tokens)
    curve = sweep(config.policy, P_calib, calib.correct, calib.scales, costs)
    summary = {
        ROUTER: {
            "policy": config.policy,
            "knob": tuned.knob,
            "knob_rule": tuned.details["rule"],
            "calib_gap_closed": gap_closed(curve, fixed, budgeted),
            "estimator": selection.router.estimator,
        }
    }
    probe_routers: dict[str, ProbeRouter] = {}
    for policy in PROBE_POLICIES if probe_selection is not None else ():
        folder = folders / policy
        router, scores = train_probe_router(calib, folder, policy, probe_selection, save=False)
        result = tune_probe_router(
            calib, folder, target, router=router, scores=scores, uncertified="calib"
        )
        curve = sweep(policy, scores, calib.correct, calib.scales, costs)
        probe_routers[policy] = router
        summary[policy] = {
            "policy": policy,
            "knob": result.knob,
            "knob_rule": result.details["rule"],
            "calib_gap_closed": gap_closed(curve, fixed, budgeted),
            "gate_threshold": router.gate_threshold,
            "estimator": {str(s): part.estimator for s, part in router.stages.items()},
        }
    default = max(summary, key=lambda name: summary[name]["calib_gap_closed"])
    shutil.rmtree(out / "router", ignore_errors=True)
    shutil.copytree(folders / default, out / "router")
    print(
        "calib out-of-fold gap closed: "
        + ", ".join(f"{name} {row['calib_gap_closed']:.3f}" for name, row in summary.items())
        + f"; default router: {default} (saved to {out / 'router'})"
    )
    routers = Routers(selection.router, probe_routers)
    return routers, summary, {"default": default, "cv": selection.report}


def evaluate_split(
    labels: LabelSet,
    calib: LabelSet,
    routers: Routers,
    config: QuickstartConfig,
    curves_dir: Path,
    png: Path,
    title: str,
) -> tuple[dict, dict[str, list[dict]]]:
    """Every number of one test split that needs no serving: fixed scales, both oracles,
    every router's curve, gap closed and tuned point, the baselines and the luck."""
    costs = labels.costs()
    fixed = fixed_points(labels.correct, labels.scales, costs)
    oracle = oracle_point(labels.correct, labels.scales)
    budgeted = budgeted_oracle_curve(labels.correct, labels.tokens)
    budgeted_a = None
    if labels.gold_prob is not None:
        budgeted_a = budgeted_oracle_curve(
            chance_corrected(labels.correct, labels.gold_prob), labels.tokens
        )
    P = routers.router.predict_proba(labels.features)
    curves = routing_curves(routers.router, labels, P, prior_from=calib)
    for name in routers.probe:
        curves[name] = sweep(
            name, routers.scores(name, labels), labels.correct, labels.scales, costs
        )

    def gaps(curve: list[dict]) -> tuple[float, float | None]:
        against_a = None if budgeted_a is None else gap_closed(curve, fixed, budgeted_a)
        return gap_closed(curve, fixed, budgeted), against_a

    largest = fixed[-1]["accuracy"]
    block: dict = {"routers": {}}
    for name in routers.names:
        curve = curves[f"router/{config.policy}" if name == ROUTER else name]
        point = routers.choice(name, labels)
        gap, gap_a = gaps(curve)
        block["routers"][name] = {
            "policy": routers.curve_policy(name, config),
            "gap_closed": gap,
            "gap_closed_oracle_a": gap_a,
            "curve": [_point(p) for p in curve],
            "no_loss_point": {
                **_point(point),
                "largest_scale_accuracy": largest,
                "token_fraction": point["mean_tokens"] / labels.scales[-1],
                "flops_fraction": point["mean_flops"] / fixed[-1]["mean_flops"],
            },
        }
    prior = family_prior(curves, labels, fixed, budgeted)
    if prior is not None:
        prior["gap_closed_oracle_a"] = gaps(curves[FAMILY_PRIOR])[1]
    cascade = gaps(curves["cascade"])
    block |= {
        "n": len(labels),
        "scales": list(labels.scales),
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
        "luck": luck(labels),
        "cascade": [_point(p) for p in curves["cascade"]],
        "cascade_gap_closed": cascade[0],
        "cascade_gap_closed_oracle_a": cascade[1],
        "family_prior": prior,
        "oracle_gain_by_family": oracle_gain_by_family(labels),
        "diagnosis": {"test": diagnosis(P, labels)},
    }
    if "probe" in routers.probe:  # the probe router at the smallest probe scale
        first = next(iter(routers.scores("probe", labels).stages.values()))
        block["diagnosis"]["probe"] = diagnosis(first, labels)
    shown = {
        name if name != ROUTER else f"router/{config.policy}": curves[
            f"router/{config.policy}" if name == ROUTER else name
        ]
        for name in routers.names
    }
    shown |= {k: v for k, v in curves.items() if k not in shown and not k.startswith("router/")}
    paths = write_curve_report(curves_dir, shown, fixed, oracle, budgeted, title=title, png=png)
    block["curve_files"] = {k: str(v) for k, v in paths.items()}
    return block, curves


def serve_split(
    lmm: NestedLMM, folders: dict[str, Path], data: Path, scales: tuple[int, ...], batch: int
) -> dict[str, dict]:
    """Every router folder, then the largest and the smallest scale, timed in one process."""
    samples = datasets.load_from_disk(str(data))
    images, questions = samples["image"], samples["question"]
    runs = {}
    jobs = [(name, folder, "auto") for name, folder in folders.items()]
    jobs += [("largest", None, scales[-1]), ("smallest", None, scales[0])]
    for name, folder, scale in tqdm(jobs, desc="serve", unit="run"):
        runs[name] = served(AdaptiveLMM.with_router(lmm, folder), images, questions, scale, batch)
    return runs


def finish_split(
    block: dict, runs: dict[str, dict], default: str, summary: dict, targets: dict, n: int
) -> dict:
    """The default router's headline keys, serving for every router, grades and reasons."""
    largest, smallest = runs["largest"], runs["smallest"]
    for name, row in block["routers"].items():
        run = runs[name]
        row["serving"] = {
            **run,
            "speedup": run["samples_per_s"] / largest["samples_per_s"],
        }
    head = block["routers"][default]
    adaptive = runs[default]
    block |= {
        "default": default,
        "policy": head["policy"],
        "router": head["curve"],
        "gap_closed": head["gap_closed"],
        "gap_closed_oracle_a": head["gap_closed_oracle_a"],
        "no_loss_point": {**head["no_loss_point"], "knob_rule": summary[default]["knob_rule"]},
        "timing": {
            "adaptive_samples_per_s": adaptive["samples_per_s"],
            "largest_scale_samples_per_s": largest["samples_per_s"],
            "speedup": adaptive["samples_per_s"] / largest["samples_per_s"],
            "router_overhead_fraction": adaptive["route_share"],
            "adaptive_mean_visual_tokens": adaptive["mean_visual_tokens"],
            "route_ms_per_sample": 1e3 * adaptive["route_s"] / n,
            "smallest_scale_ms_per_sample": 1e3 * smallest["seconds"] / n,
            "smallest_scale_speedup": smallest["samples_per_s"] / largest["samples_per_s"],
            "mean_attempts": adaptive["mean_attempts"],
            "repeated_share": adaptive["repeated_share"],
            "probe_prefill_fraction": adaptive["probe_prefill_share"],
        },
    }
    block["targets"] = grade(block, targets)
    block["why_missed"] = why_missed(block)
    return block


def run_quickstart(config: QuickstartConfig) -> dict:
    targets = parse_targets(config.targets)
    loss = targets["accuracy_loss"]
    if not 0 < loss < 1:
        raise ValueError(f"the accuracy_loss target must lie in (0, 1), got {loss:g}")
    if config.policy not in ROUTER_POLICIES:
        raise ValueError(f"policy must be one of {ROUTER_POLICIES}, got {config.policy!r}")
    if config.extra_test_seed is not None and config.extra_test_seed == config.seed:
        raise ValueError("the second test split needs another generator seed than --seed")
    out = Path(config.out)
    model = resolve_model(config.model)
    extra = config.extra_test_seed is not None

    step(1, f"benchmark: {config.calib_images} calib and {config.test_images} test images")
    make_splits(
        out / "data", {"calib": config.calib_images, "test": config.test_images}, config.seed
    )
    if extra:
        seed = config.extra_test_seed
        print(f"and a second test split of {config.test_images} images (seed {seed})")
        make_splits(out / "data-extra", {"test": config.test_images}, config.extra_test_seed)
    step(2, "labelling the calib split at every scale")
    calib = label_split(model, out / "data" / "calib", out / "labels-calib", config.workers)
    step(3, "labelling the test split" + (" and the second test split" if extra else ""))
    test = label_split(model, out / "data" / "test", out / "labels-test", config.workers)
    splits = {"test": test}
    if extra:
        splits["extra_test"] = label_split(
            model, out / "data-extra" / "test", out / "labels-extra-test", config.workers
        )

    routers, summary, fitted = fit_and_tune(config, calib, out, loss)
    default = fitted["default"]

    step(6, "evaluating on the test split" + ("s" if extra else "") + ": every router")
    blocks, curves = {}, {}
    for name, labels in splits.items():
        suffix = "" if name == "test" else "-extra"
        blocks[name], curves[name] = evaluate_split(
            labels,
            calib,
            routers,
            config,
            out / f"curves{suffix}",
            out / f"pareto{suffix}.png",
            f"routers vs fixed scales ({name.replace('_', ' ')} split)",
        )
        blocks[name]["diagnosis"]["calib"] = diagnosis(
            routers.router.predict_proba(calib.features), calib
        )

    step(7, "serving each test split: every router, then the largest and the smallest scale")
    lmm = NestedLMM.from_pretrained(model)
    folders = {name: out / "routers" / name for name in routers.names}
    data = {"test": out / "labels-test", "extra_test": out / "labels-extra-test"}
    for name, labels in splits.items():
        runs = serve_split(lmm, folders, data[name] / "samples", labels.scales, config.serve_batch)
        finish_split(blocks[name], runs, default, summary, targets, len(labels))

    step(8, f"report: {out / 'report.json'}, report.md")
    report = {
        "model": str(model),
        "samples": {name: len(labels) for name, labels in (("calib", calib), *splits.items())},
        "scales": list(test.scales),
        "default_router": default,
        "routers_offered": summary,
        **blocks["test"],
        "router_estimator": routers.router.estimator,
        "cv": {k: v for k, v in fitted["cv"].items() if k != "candidates"},
    }
    if extra:
        report["extra_test"] = {"seed": config.extra_test_seed, **blocks["extra_test"]}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "report.md").write_text(quickstart_markdown(report))
    return report


def _point(p: dict) -> dict:
    keys = ("knob", "accuracy", "mean_tokens", "mean_flops")
    return {k: float(p[k]) for k in keys if k in p and p[k] is not None}
