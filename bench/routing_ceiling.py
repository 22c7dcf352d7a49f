"""How much of the oracle gap routing by question type (and true image detail) can close.

    python bench/routing_ceiling.py runs/quickstart

Reads a quickstart folder's calib and test labels. Each baseline routes every sample of a
group to one scale, with the group's accuracy per scale as P(correct) and the utility policy
swept over its knob, the same as the router's curve. Groups are the question family, then the
family crossed with the image's true detail level from the synthetic generator's metadata,
which no router sees. "calib" fits the groups on calib, "hindsight" on test itself (the most
such a router can do). Printed beside the quickstart router's own gap_closed on test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets

from pipelines.labels import LabelSet, read_labels
from pipelines.routing import group_prior_curve
from predictor import budgeted_oracle_curve, fixed_points, gap_closed


def detail_groups(labels: LabelSet, samples: Path) -> list[str]:
    """family x the generator's detail level, per sample in label order."""
    meta = datasets.load_from_disk(str(samples)).select_columns(["id", "meta"])
    detail = {row["id"]: json.loads(row["meta"]).get("detail", "") for row in meta}
    return [f"{fam}/{detail[i]}" for fam, i in zip(labels.families, labels.ids, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quickstart_dir", type=Path)
    args = parser.parse_args()
    root = args.quickstart_dir
    calib, test = read_labels(root / "labels-calib"), read_labels(root / "labels-test")
    fixed = fixed_points(test.correct, test.scales, test.costs())
    budgeted = budgeted_oracle_curve(test.correct, test.tokens)

    def closed(fit: LabelSet, fit_groups: list[str], groups: list[str]) -> float:
        return gap_closed(group_prior_curve(fit, fit_groups, test, groups), fixed, budgeted)

    report = json.loads((root / "report.json").read_text())
    print(f"router ({report['router_estimator']}, {report['policy']}): {report['gap_closed']:.3f}")
    for name, c_groups, t_groups in (
        ("question family", calib.families, test.families),
        (
            "family x true detail",
            detail_groups(calib, root / "labels-calib" / "samples"),
            detail_groups(test, root / "labels-test" / "samples"),
        ),
    ):
        print(
            f"{name}: calib {closed(calib, c_groups, t_groups):.3f}, "
            f"hindsight {closed(test, t_groups, t_groups):.3f} ({len(set(t_groups))} groups)"
        )


if __name__ == "__main__":
    main()
