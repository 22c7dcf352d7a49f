"""The quickstart's targets: what a run is graded against, as the user states them.

A target is `NAME<=N` or `NAME>=N`; `--targets` overrides `DEFAULT_TARGETS` by name. This
module stays free of heavy imports: the CLI's help text shows the defaults.
"""

from __future__ import annotations

import re

TARGETS: dict[str, tuple[str, str]] = {
    "accuracy_loss": ("<=", "accuracy lost at the router's no-loss point vs the largest scale"),
    "token_fraction": ("<=", "the no-loss point's mean visual tokens / the largest scale's"),
    "gap_closed": (">=", "share of the fixed-scale to budgeted-oracle gap the router closes"),
    "family_margin": (">=", "the router's gap closed minus routing by question family's"),
    "speedup": (">=", "adaptive serving's samples/s / the largest scale's"),
    "router_overhead": (
        "<=",
        "features, routers and probe calls whose answers are not kept, as a share of the "
        "adaptive run's time",
    ),
}
"""What each quickstart target measures, and which way it must go."""
DEFAULT_TARGETS = (
    "accuracy_loss<=0.005,token_fraction<=0.2,gap_closed>=0.6,family_margin>=0.1,speedup>=2,"
    "router_overhead<=0.05"
)
_TARGET = re.compile(r"^\s*([a-z_]+)\s*(<=|>=)\s*([0-9.eE+-]+)\s*$")


def parse_targets(text: str | None = None) -> dict[str, float]:
    """`DEFAULT_TARGETS`, each replaced by the one of the same name in `text` (comma-separated,
    e.g. "gap_closed>=0.4,speedup>=1.5")."""
    targets: dict[str, float] = {}
    for source in (DEFAULT_TARGETS, text or ""):
        for part in filter(None, (p.strip() for p in source.split(","))):
            m = _TARGET.match(part)
            if m is None or m.group(1) not in TARGETS:
                raise ValueError(
                    f"cannot read target {part!r}; use NAME<=N or NAME>=N with NAME one of "
                    f"{', '.join(TARGETS)}"
                )
            name, op, value = m.group(1), m.group(2), m.group(3)
            if op != TARGETS[name][0]:
                raise ValueError(f"target {part!r}: {name} takes {TARGETS[name][0]}")
            try:
                targets[name] = float(value)
            except ValueError as exc:
                raise ValueError(f"target {part!r}: {value!r} is not a number") from exc
    return targets


def grade(report: dict, targets: dict[str, float]) -> dict[str, dict]:
    """Each target with its bar, the value this run measured, and whether it is met (None:
    not measurable here, e.g. a family margin without question families)."""
    nl, timing = report["no_loss_point"], report["timing"]
    prior = report.get("family_prior")
    measured = {
        "accuracy_loss": nl["largest_scale_accuracy"] - nl["accuracy"],
        "token_fraction": nl["token_fraction"],
        "gap_closed": report["gap_closed"],
        "family_margin": None if prior is None else report["gap_closed"] - prior["gap_closed"],
        "speedup": timing["speedup"],
        "router_overhead": timing["router_overhead_fraction"],
    }
    out = {}
    for name, bar in targets.items():
        op, value = TARGETS[name][0], measured[name]
        met = None if value is None else bool(value <= bar if op == "<=" else value >= bar)
        out[name] = {"op": op, "target": bar, "measured": value, "met": met}
    return out
