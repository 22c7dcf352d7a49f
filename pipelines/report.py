"""The granularity report: accuracy per scale, the oracle, per family, and the budgeted oracle.

Layout follows the M3 paper: Table 1 (family x scale accuracy) and Table 2 (oracle accuracy and
mean tokens beside the largest scale), plus the accuracy-vs-mean-tokens plot (log x-axis).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipelines.labels import LabelSet
from predictor import budgeted_oracle_curve, fixed_points, oracle_point, write_curve_report


def scale_table(correct: np.ndarray, scales: tuple[int, ...]) -> dict:
    """Accuracy at every scale plus the oracle's accuracy and mean tokens for one group."""
    accuracy, tokens = oracle_point(correct, scales)
    return {
        "n": int(correct.shape[0]),
        "accuracy": {str(s): float(correct[:, j].mean()) for j, s in enumerate(scales)},
        "oracle": {"accuracy": accuracy, "mean_tokens": tokens},
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
    by = {
        kind: {
            name: scale_table(labels.correct[rows], labels.scales)
            for name, rows in sorted(members.items())
        }
        for kind, members in groups.items()
    }
    wrong_everywhere = int((~labels.correct.any(1)).sum())
    return {
        "scales": list(labels.scales),
        "all": scale_table(labels.correct, labels.scales),
        "wrong_at_every_scale": wrong_everywhere,
        "observed_fraction": float(labels.observed.mean()),
        "by_level": by["level"],
        "by_family": by["family"],
        "budgeted_oracle": [list(p) for p in budgeted_oracle_curve(labels.correct, labels.tokens)],
        "skipped": len(labels.skipped),
    }


def markdown(report: dict) -> str:
    scales = report["scales"]
    head = "| group | n | " + " | ".join(f"{s} tok" for s in scales) + " | oracle | oracle tok |"
    rule = "|" + "---|" * (len(scales) + 4)
    lines = ["# Granularity report", "", head, rule]

    def row(name: str, table: dict) -> str:
        cells = " | ".join(f"{100 * table['accuracy'][str(s)]:.1f}" for s in scales)
        oracle = table["oracle"]
        return (
            f"| {name} | {table['n']} | {cells} | {100 * oracle['accuracy']:.1f} | "
            f"{oracle['mean_tokens']:.1f} |"
        )

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
    paths["granularity_md"].write_text(markdown(report))
    return paths
