"""How much of the oracle gap routing by question type (and true image detail) can close.

    python bench/routing_ceiling.py runs/quickstart

Reads a quickstart folder's calib and test labels. Each baseline routes every sample of a
group to one scale, with the group's accuracy per scale as P(correct) and the utility policy
swept over its knob, the same as the router's curve. Groups are the question family, then the
family crossed with the image's true detail level from the synthetic generator's metadata,
which no router sees. "calib" fits the groups on calib, "hindsight" on test itself (the most
such a router can do). Printed beside the quickstart router's own gap_closed on test.

Then where the rest of the gap lives: the family prior with each sample's correctness at the
smallest scale known (a perfect check of the 1-token answer, the ceiling of any cascade), and
with that check replaced by the 1-token answer's own confidence, calibrated on calib
(isotonic), where every sample is answered at 1 token first and an escalated one pays that
answer's tokens, FLOPs and latency too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets
import numpy as np
from sklearn.isotonic import IsotonicRegression

from pipelines.labels import LabelSet, read_labels
from pipelines.routing import group_prior_curve
from predictor import budgeted_oracle_curve, fixed_points, gap_closed, group_prior, sweep


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

    def with_first(first: np.ndarray, pay_first: bool) -> float:
        P = group_prior(calib.correct, calib.families, test.families)
        P[:, 0] = first
        costs = test.costs()
        if pay_first:  # an escalated sample has paid for its 1-token answer too, in every cost
            costs = {k: v + np.where(np.arange(len(v)) > 0, v[0], 0) for k, v in costs.items()}
        curve = sweep("utility", P, test.correct, test.scales, costs)
        return gap_closed(curve, fixed, budgeted)

    known = with_first(np.clip(test.correct[:, 0], 0.01, 0.99), pay_first=False)
    isotonic = IsotonicRegression(y_min=0.01, y_max=0.99, out_of_bounds="clip")
    isotonic.fit(calib.confidence[:, 0], calib.correct[:, 0])
    checked = with_first(isotonic.predict(test.confidence[:, 0]), pay_first=True)
    print(f"family prior + 1-token correctness known (hindsight): {known:.3f}")
    print(f"family prior + 1-token answer confidence (answered at 1 token first): {checked:.3f}")


if __name__ == "__main__":
    main()
