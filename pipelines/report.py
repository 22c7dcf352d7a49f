"""Reports in words and tables: the granularity report and the quickstart's report.

The granularity report follows the M3 paper: Table 1 (family x scale accuracy) and Table 2
(oracle accuracy and mean tokens beside the largest scale), plus the accuracy-vs-mean-tokens
plot (log x-axis). Where the labels hold the gold answer's probability it also says how much
of the oracle is luck: the share of samples right at each scale by a plurality win (P(gold) <
0.5), and oracle "A", which does not count those below the largest scale. The papers' oracle
stays the headline; A explains it. The quickstart's part shows a run graded against the
user's targets (`pipelines.targets`) and says, from measured diagnostics, why a missed one is
missed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from pipelines.labels import LabelSet
from pipelines.routing import FAMILY_PRIOR, group_prior_curve
from pipelines.targets import TARGETS
from predictor import (
    budgeted_oracle_curve,
    chance_corrected,
    fixed_points,
    gap_closed,
    oracle_point,
    plurality_share,
    write_curve_report,
)
from predictor.oracle import LUCK_THRESHOLD


def scale_table(
    correct: np.ndarray, scales: tuple[int, ...], gold_prob: np.ndarray | None = None
) -> dict:
    """Accuracy at every scale plus the oracle's accuracy and mean tokens for one group; with
    `gold_prob`, also oracle A's and the share right at each scale by a plurality win."""
    accuracy, tokens = oracle_point(correct, scales)
    table = {
        "n": int(correct.shape[0]),
        "accuracy": {str(s): float(correct[:, j].mean()) for j, s in enumerate(scales)},
        "oracle": {"accuracy": accuracy, "mean_tokens": tokens},
    }
    if gold_prob is not None and len(correct):
        a_accuracy, a_tokens = oracle_point(chance_corrected(correct, gold_prob), scales)
        shares = plurality_share(correct, gold_prob)
        table["oracle_a"] = {"accuracy": a_accuracy, "mean_tokens": a_tokens}
        table["plurality_right"] = {str(s): float(v) for s, v in zip(scales, shares, strict=True)}
    return table


def luck(labels: LabelSet) -> dict | None:
    """How much of the papers' oracle is luck, from the gold answer's probability (None where
    the labels lack it): the share of samples right at each scale by a plurality win, oracle
    A's point, and how much of the papers' fixed-to-oracle gap A's frontier spans."""
    if labels.gold_prob is None:
        return None
    correct, tokens = labels.correct, labels.tokens
    fixed = fixed_points(correct, labels.scales, labels.costs())
    papers = budgeted_oracle_curve(correct, tokens)
    oracle_a = chance_corrected(correct, labels.gold_prob)
    a_accuracy, a_tokens = oracle_point(oracle_a, labels.scales)
    return {
        "threshold": LUCK_THRESHOLD,
        "plurality_right": {
            str(s): float(v)
            for s, v in zip(labels.scales, plurality_share(correct, labels.gold_prob), strict=True)
        },
        "oracle_a": {"accuracy": a_accuracy, "mean_tokens": a_tokens},
        "oracle_a_budgeted": [list(p) for p in budgeted_oracle_curve(oracle_a, tokens)],
        "oracle_a_share_of_gap": gap_closed(budgeted_oracle_curve(oracle_a, tokens), fixed, papers),
    }


def granularity(labels: LabelSet) -> dict:
    """All numbers of the report as one JSON-ready dict."""
    groups: dict[str, dict[str, list[int]]] = {
        "family": defaultdict(list),
        "level": defaultdict(list),
    }
    for i, (family, level) in enumerate(zip(labels.families, labels.levels, strict=True)):
        if family:
            groups["family"][family].append(i)
        if level:
            groups["level"][level].append(i)
    gold = labels.gold_prob

    def table(rows: list[int] | slice) -> dict:
        return scale_table(
            labels.correct[rows], labels.scales, None if gold is None else gold[rows]
        )

    by = {
        kind: {name: table(rows) for name, rows in sorted(members.items())}
        for kind, members in groups.items()
    }
    wrong_everywhere = int((~labels.correct.any(1)).sum())
    return {
        "scales": list(labels.scales),
        "all": table(slice(None)),
        "luck": luck(labels),
        "wrong_at_every_scale": wrong_everywhere,
        "observed_fraction": float(labels.observed.mean()),
        "by_level": by["level"],
        "by_family": by["family"],
        "budgeted_oracle": [list(p) for p in budgeted_oracle_curve(labels.correct, labels.tokens)],
        "skipped": len(labels.skipped),
    }


def granularity_markdown(report: dict) -> str:
    scales = report["scales"]
    lucky = report.get("luck") is not None
    head = "| group | n | " + " | ".join(f"{s} tok" for s in scales) + " | oracle | oracle tok |"
    head += " oracle A | A tok | right by plurality at " + ", ".join(map(str, scales)) + " |"
    rule = "|" + "---|" * (len(scales) + 4 + (3 if lucky else 0))
    if not lucky:
        head = head[: head.index(" oracle A")]
    lines = ["# Granularity report", "", head, rule]

    def row(name: str, table: dict) -> str:
        cells = " | ".join(f"{100 * table['accuracy'][str(s)]:.1f}" for s in scales)
        oracle = table["oracle"]
        text = (
            f"| {name} | {table['n']} | {cells} | {100 * oracle['accuracy']:.1f} | "
            f"{oracle['mean_tokens']:.1f} |"
        )
        if lucky and "oracle_a" in table:
            shares = "/".join(f"{100 * v:.1f}" for v in table["plurality_right"].values())
            a = table["oracle_a"]
            text += f" {100 * a['accuracy']:.1f} | {a['mean_tokens']:.1f} | {shares} |"
        return text

    lines.append(row("**all**", report["all"]))
    for name, table in report["by_level"].items():
        lines.append(row(f"level: {name}", table))
    for name, table in report["by_family"].items():
        lines.append(row(name, table))
    lines += [
        "",
        f"Samples wrong at every scale (counted at the smallest scale by the oracle): "
        f"{report['wrong_at_every_scale']}. Skipped samples: {report['skipped']}.",
    ]
    if lucky:
        luck_ = report["luck"]
        lines += [
            "",
            f"Luck: a greedy answer is right by a plurality win where the model gives the gold "
            f"answer with probability below {luck_['threshold']:g} (re-asked, it would answer "
            "otherwise more often than not). Oracle A does not count those below the largest "
            f"scale; its frontier spans {luck_['oracle_a_share_of_gap']:.3f} of the papers' "
            "fixed-scale to oracle gap. The papers' oracle stays the headline.",
        ]
    return "\n".join(lines) + "\n"


def write_granularity(labels: LabelSet, out_dir: str | Path) -> dict[str, Path]:
    """granularity.json / .md and the plot (curve.png) of fixed scales, oracle, budgeted oracle."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = granularity(labels)
    paths = write_curve_report(
        out,
        curves={},
        fixed_points=fixed_points(labels.correct, labels.scales, labels.costs()),
        oracle_point=oracle_point(labels.correct, labels.scales),
        budgeted_oracle=budgeted_oracle_curve(labels.correct, labels.tokens),
        title="accuracy vs mean visual tokens",
    )
    paths["granularity_json"] = out / "granularity.json"
    paths["granularity_md"] = out / "granularity.md"
    paths["granularity_json"].write_text(json.dumps(report, indent=1))
    paths["granularity_md"].write_text(granularity_markdown(report))
    return paths


# -- the quickstart's diagnostics and report.md ----------------------------------------------


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


def _points(loss: float) -> str:
    """An accuracy loss in words: 0.01 -> "1 point"."""
    return f"{100 * loss:g} point" + ("" if 100 * loss == 1 else "s")


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
    """One measured reason per missed target, for report.md."""
    test, calib = report["diagnosis"]["test"], report["diagnosis"]["calib"]
    t, nl = report["timing"], report["no_loss_point"]
    within = _points(report["targets"]["accuracy_loss"]["target"])
    gain = report["oracle"]["accuracy"] - nl["largest_scale_accuracy"]
    fp = report.get("family_prior")
    gap_bar = report["targets"]["gap_closed"]["target"]
    by_family = (
        ""
        if fp is None
        else "sending each question family to the scale that suits it closes "
        f"{fp['gap_closed']:.3f} (fitted on calib; {fp['hindsight_gap_closed']:.3f} fitted on "
        f"test in hindsight) against the router's {report['gap_closed']:.3f}, "
        + (
            f"so the question type alone cannot reach {gap_bar:g} and the rest must come from "
            "the image; "
            if fp["hindsight_gap_closed"] < gap_bar
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
    probe = report["diagnosis"].get("probe")
    if probe is not None:
        smallest = str(report["scales"][0])
        predictability += (
            f"; the probe of the model's own {smallest}-token prefill tells a right "
            f"{smallest}-token answer from a wrong one at ROC AUC "
            f"{_fmt3(probe['router_auc'][smallest])} (the router's features: "
            f"{_fmt3(test['router_auc'][smallest])}), and picks the right one of two "
            f"disagreeing scales at {_span(probe['choice_auc'])}"
        )
    cannot_pick = (
        "the router cannot tell which samples need a larger scale (ROC AUC "
        f"{_span(test['choice_auc'])} on test at picking the right one of two disagreeing scales)"
    )
    luck_ = report.get("luck")
    lucky = ""
    if luck_ is not None and report.get("gap_closed_oracle_a") is not None:
        first = next(iter(luck_["plurality_right"].values()))
        lucky = (
            f"; {100 * first:.1f} % of the samples are right at the smallest scale only by a "
            "plurality win (the model gives the gold answer there with probability below "
            f"{luck_['threshold']:g}: re-asked, it would answer otherwise more often than not), "
            "and the papers' oracle banks every one of them: oracle A, which does not, spans "
            f"{luck_['oracle_a_share_of_gap']:.3f} of the papers' gap, and against it the router "
            f"closes {report['gap_closed_oracle_a']:.3f}"
        )
    speedup = report["targets"].get("speedup", {}).get("target", 2.0)
    overhead = report["targets"].get("router_overhead", {}).get("target", 0.01)
    attempts = t.get("mean_attempts", 1.0)
    staged = (
        ""
        if attempts <= 1.0 + 1e-9
        else f"; the {report['policy']} policy makes {attempts:.2f} generate calls per sample "
        f"({100 * t.get('repeated_share', 0.0):.0f} % of the samples pay a prefill at a probe "
        "scale and then another at the scale they are answered at)"
    )
    margin = None if fp is None else report["gap_closed"] - fp["gap_closed"]
    reasons = {
        "accuracy_loss": cannot_pick,
        "gap_closed": predictability + lucky,
        "family_margin": (
            ""
            if margin is None
            else f"the router closes {report['gap_closed']:.3f} of the gap against "
            f"{fp['gap_closed']:.3f} for routing by question family (+{margin:.3f}; the family "
            f"lookup fitted on test in hindsight closes {fp['hindsight_gap_closed']:.3f}), so "
            "all it can add is which scale a sample needs within its family: " + cannot_pick + lucky
        ),
        "token_fraction": (
            f"staying within {within} costs {nl['mean_tokens']:.1f} mean visual tokens: "
            + cannot_pick
        ),
        "speedup": (
            f"the adaptive run averages {t['adaptive_mean_visual_tokens']:.1f} visual tokens to "
            f"stay within {within}{staged}: " + cannot_pick
            if t["smallest_scale_speedup"] >= speedup
            else f"answering every sample at the smallest scale serves only "
            f"{t['smallest_scale_speedup']:.2f}x the largest scale's samples/s on this model "
            f"(its largest scale is {report['scales'][-1]} tokens, and per-sample costs that do "
            f"not shrink with the tokens dominate), so no routing reaches {speedup:g}x here"
        ),
        "router_overhead": (
            f"features + router take {t['route_ms_per_sample']:.3f} ms per sample, mostly fixed "
            f"per-call costs, against {t['smallest_scale_ms_per_sample']:.2f} ms for a "
            f"smallest-scale answer of this tiny model; {100 * overhead:g} % holds for any model "
            f"whose smallest-scale answer takes {t['route_ms_per_sample'] / overhead:.0f} ms per "
            "sample or more"
            if attempts <= 1.0 + 1e-9
            else f"routing takes {t['route_ms_per_sample']:.3f} ms per sample against "
            f"{t['smallest_scale_ms_per_sample']:.2f} ms for a smallest-scale answer: the "
            f"routers, and the probe calls whose answers are thrown away{staged}; the prefill "
            f"of every probe call, kept or not, is {100 * t.get('probe_prefill_fraction', 0):.1f}"
            " % of the run"
        ),
    }
    return {name: reasons[name] for name, row in report["targets"].items() if row["met"] is False}


def quickstart_markdown(report: dict) -> str:
    """report.md: per test split the points, every router's gap closed (against the papers'
    oracle and oracle A), no-loss point and serving, the luck, and the targets."""
    lines = ["# adaptive-m3 quickstart", ""]
    offered = report.get("routers_offered")
    if offered:
        calib = ", ".join(f"{name} {row['calib_gap_closed']:.3f}" for name, row in offered.items())
        lines += [
            f"Default router: **{report['default_router']}**, the one with the largest gap "
            f"closed on the calib split's out-of-fold scores ({calib}); every router below is "
            f"in `routers/<name>`, the default also in `router`.",
            "",
        ]
    splits = [("test split", report)]
    if report.get("extra_test"):
        extra = report["extra_test"]
        splits.append((f"second test split (generator seed {extra['seed']})", extra))
    for title, block in splits:
        lines += _split_markdown(title, block)
    return "\n".join(lines) + "\n"


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def _split_markdown(title: str, report: dict) -> list[str]:
    lines = [
        f"## {title}" + (f", {report['n']} questions" if "n" in report else ""),
        "",
        "| point | accuracy | mean visual tokens |",
        "|---|---|---|",
    ]
    for scale, p in report["fixed"].items():
        lines.append(f"| fixed {scale} | {100 * p['accuracy']:.1f} | {p['mean_tokens']:.1f} |")
    o, nl = report["oracle"], report["no_loss_point"]
    lines.append(f"| oracle (the papers') | {100 * o['accuracy']:.1f} | {o['mean_tokens']:.1f} |")
    luck_ = report.get("luck")
    if luck_ is not None:
        a = luck_["oracle_a"]
        lines.append(
            f"| oracle A (no plurality wins below the largest scale) | "
            f"{100 * a['accuracy']:.1f} | {a['mean_tokens']:.1f} |"
        )
    lines.append(
        f"| router at no-loss knob ({report['policy']}, {nl['knob_rule']}) | "
        f"{100 * nl['accuracy']:.1f} | {nl['mean_tokens']:.1f} |"
    )
    t = report["timing"]
    within = _points(report["targets"]["accuracy_loss"]["target"])
    routers = report.get("routers")
    if routers:
        largest = nl["largest_scale_accuracy"]
        lines += [
            "",
            "| router | gap closed | vs oracle A | no-loss: accuracy loss (points) | tokens % | "
            "FLOPs % | serving speed-up | routing share % |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, row in routers.items():
            point, serve = row["no_loss_point"], row.get("serving") or {}
            label = name if name == row["policy"] else f"{name} ({row['policy']})"
            label += ", default" if name == report.get("default") else ""
            lines.append(
                f"| {label} | {row['gap_closed']:.3f} | {_fmt3(row.get('gap_closed_oracle_a'))} | "
                f"{100 * (largest - point['accuracy']):.2f} | {_pct(point['token_fraction'])} | "
                f"{_pct(point.get('flops_fraction'))} | {_fmt3(serve.get('speedup'), 'x')} | "
                f"{_pct(serve.get('route_share'), 2)} |"
            )
        others = [("question-family lookup", report.get("family_prior"))]
        cascade = {
            "gap_closed": report["cascade_gap_closed"],
            "gap_closed_oracle_a": report.get("cascade_gap_closed_oracle_a"),
        }
        others.append(("confidence cascade", cascade))
        for name, row in others:
            if row is not None:
                lines.append(
                    f"| {name} | {row['gap_closed']:.3f} | "
                    f"{_fmt3(row.get('gap_closed_oracle_a'))} | | | | | |"
                )
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
            if nl["knob_rule"] != "most accurate"
            else f" (no knob kept calib within {within}, so the router runs at its most "
            f"accurate knob, {nl['knob']:g})"
        ),
        f"serving: adaptive {t['adaptive_samples_per_s']:.1f} samples/s vs largest scale "
        f"{t['largest_scale_samples_per_s']:.1f} samples/s (x{t['speedup']:.2f}); router "
        f"overhead {100 * t['router_overhead_fraction']:.2f} % of the adaptive run",
    ]
    if luck_ is not None:
        shares = ", ".join(f"{s}: {_pct(v)} %" for s, v in luck_["plurality_right"].items())
        lines.append(
            f"luck: samples right only by a plurality win (P(gold) < {luck_['threshold']:g}) "
            f"at each scale: {shares}; oracle A spans {luck_['oracle_a_share_of_gap']:.3f} of "
            "the papers' gap"
        )
    lines += ["", "| target | measures | measured | met |", "|---|---|---|---|"]
    for name, row in report["targets"].items():
        met = {True: "yes", False: "NO", None: "n/a"}[row["met"]]
        lines.append(
            f"| {name} {row['op']} {row['target']:g} | {TARGETS[name][1]} | "
            f"{_fmt3(row['measured'])} | {met} |"
        )
    if report["why_missed"]:
        lines += ["", "Why the missed targets are missed (measured in this run):", ""]
        reasons: dict[str, list[str]] = {}
        for name, why in report["why_missed"].items():
            reasons.setdefault(why, []).append(name)
        lines += [f"- {', '.join(names)}: {why}" for why, names in reasons.items()]
    return lines + [""]


def _fmt3(value: float | None, suffix: str = "") -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:.3f}{suffix}" if not suffix else f"{suffix}{value:.2f}"
