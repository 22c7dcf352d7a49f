"""Choose a policy's knob on the calib split: for a cost budget, or for a bounded accuracy loss.

Router (predictor.routers) and calibration (here) are separate, as in RouteLLM's
`routers/` vs `calibrate_threshold.py`: a router gives scores, calibration turns a target
into a knob using labelled calibration data the router was NOT trained on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.stats import binom

from predictor.curves import (
    COST_KEYS,
    checked_scores,
    cost_matrix,
    evaluate_choice,
    evaluate_knobs,
    no_loss_point,
    sweep,
)
from predictor.features import validate_correct, validate_scales
from predictor.policies import ProbeScores, conservative_first, default_knobs, get_policy
from predictor.serving import RouterFileError

__all__ = [
    "TuneResult",
    "tune_to_budget",
    "tune_to_accuracy_loss",
    "parse_target",
    "tune",
    "checked_target",
    "CALIBRATION_JSON",
    "calibration_table",
    "knob_for_target",
    "save_calibration",
    "load_calibration",
]

CALIBRATION_JSON = "calibration.json"
_TABLE_FORMAT, _TABLE_VERSION = "adaptive-m3/calibration", 1


@dataclass
class TuneResult:
    """The chosen knob, what it achieved on the calib split, and what was asked for.

    `knob` means what `POLICIES[policy].knob` says. `policy` may come back as "fixed" with
    `knob` = the largest scale: the accuracy-loss tuner's answer when it cannot certify any
    cheaper knob. For an accuracy loss, `details["rule"]` says how the knob was found.
    """

    policy: str
    knob: float
    metrics: dict
    target: dict
    certified: bool | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _checked_inputs(P, correct, scales, costs):
    """Validated (scales, correct, scores, costs); token costs default to the scales."""
    scales = validate_scales(scales)
    correct = validate_correct(correct, n_scales=len(scales))
    scores = checked_scores(P, correct.shape)
    costs = dict(costs or {})
    costs.setdefault("tokens", np.asarray(scales, dtype=np.float64))
    return scales, correct, scores, costs


def tune_to_budget(
    P: np.ndarray | ProbeScores,
    correct: np.ndarray,
    scales: Sequence[int],
    costs: Mapping[str, object] | None,
    target_metric: str,
    target_value: float,
    policy: str = "threshold",
    knobs: Sequence[float] | None = None,
) -> TuneResult:
    """The knob with the best calib accuracy whose mean cost <= target_value.

    target_metric is "tokens", "flops" or "latency" (latency may be per sample, (n, S)).
    This meets the budget on the calib split; on new data the mean cost is an estimate with
    sampling error of order std/sqrt(n). Raises ValueError if no knob fits the budget.
    """
    if target_metric not in COST_KEYS:
        raise ValueError(f"target_metric must be one of {COST_KEYS}, got {target_metric!r}")
    if target_metric != "tokens" and (costs is None or costs.get(target_metric) is None):
        raise ValueError(f"a {target_metric} target needs costs[{target_metric!r}]")
    curve = sweep(policy, P, correct, scales, costs, knobs)
    return _best_within_budget(
        curve, policy, target_metric, float(target_value), int(np.shape(correct)[0])
    )


def _best_within_budget(
    curve: Sequence[Mapping[str, object]],
    policy: str,
    target_metric: str,
    target_value: float,
    n_calib: int,
) -> TuneResult:
    """The budget decision, shared by `tune_to_budget` and `knob_for_target`."""
    key = f"mean_{target_metric}"
    if any(p[key] is None for p in curve):
        raise ValueError(f"a {target_metric} target needs costs[{target_metric!r}]")
    ok = [p for p in curve if p[key] <= target_value * (1 + 1e-9)]
    if not ok:
        cheapest = min(p[key] for p in curve)
        raise ValueError(
            f"no {policy} knob reaches mean {target_metric} <= {target_value:g} on the calib "
            f"split; the cheapest reaches {cheapest:g}"
        )
    best = max(ok, key=lambda p: (p["accuracy"], -p[key]))
    return TuneResult(
        policy=policy,
        knob=float(best["knob"]),
        metrics=_metrics(best),
        target={"metric": target_metric, "value": float(target_value)},
        details={"n_calib": n_calib, "knobs_tried": len(curve)},
    )


def _metrics(row: Mapping[str, object]) -> dict:
    """A knob row's accuracy and costs, without the knob and the loss count."""
    return {k: v for k, v in row.items() if k not in ("knob", "losses")}


def tune_to_accuracy_loss(
    P: np.ndarray | ProbeScores,
    correct: np.ndarray,
    scales: Sequence[int],
    epsilon: float,
    delta: float,
    policy: str = "threshold",
    costs: Mapping[str, object] | None = None,
    knobs: Sequence[float] | None = None,
    uncertified: str = "largest",
) -> TuneResult:
    """The cheapest knob with P(accuracy loss vs the largest scale > epsilon) <= delta.

    Learn-then-Test (Angelopoulos et al., 2021) with fixed-sequence testing. Per-sample loss
    L_i = 1[largest scale correct and routed scale wrong]; its mean, the risk R(knob),
    bounds the accuracy loss from above (acc_largest - acc_routed = E[L] - E[routed right,
    largest wrong] <= R). For each knob, from the one that spends most to the one that
    spends least on a grid fixed in advance, test H0: R(knob) > epsilon with the exact
    binomial p-value P(Binom(n, epsilon) <= sum L_i); stop at the first p > delta. Fixed-
    sequence testing controls the family-wise error at delta, so every knob tested before
    the stop has R <= epsilon simultaneously with probability >= 1 - delta over the draw of
    the calibration set; we return the cheapest of them. The guarantee is on the expected
    loss over new data from the calibration distribution, and needs the router's scores to
    come from a model not fitted on these calibration rows.

    If no knob is certified: with `uncertified="largest"` the result is policy "fixed" at the
    largest scale (loss 0 by definition); with "calib" the policy keeps the cheapest knob
    without accuracy loss on these rows, else the cheapest within epsilon, else its
    `safe_knob` (rule "calib" or "most accurate"; no guarantee, for calib splits too small
    to certify anything).
    """
    if not 0 < epsilon < 1 or not 0 < delta < 1:
        raise ValueError(f"epsilon and delta must lie in (0, 1), got {epsilon}, {delta}")
    if uncertified not in ("largest", "calib"):
        raise ValueError(f"uncertified must be 'largest' or 'calib', got {uncertified!r}")
    scales, correct, scores, costs = _checked_inputs(P, correct, scales, costs)
    n, S = correct.shape
    order = conservative_first(policy, default_knobs(policy) if knobs is None else knobs)
    rows = evaluate_knobs(policy, scores, correct, scales, costs, order)
    largest_accuracy = float(correct[:, -1].mean())
    result = _learn_then_test(
        policy,
        rows,
        n,
        epsilon,
        delta,
        largest_scale=float(scales[-1]),
        largest_accuracy=largest_accuracy,
        largest_metrics=evaluate_choice(np.full(n, S - 1), correct, costs),
    )
    if result.certified or uncertified == "largest":
        return result
    ascending = sorted(rows, key=lambda r: r["knob"])
    for tol in (0.0, epsilon):
        point = no_loss_point(ascending, largest_accuracy, tol=tol)
        if point is not None:
            result.details["rule"] = "calib"
            knob = float(point["knob"])
            return replace(result, policy=policy, knob=knob, metrics=_metrics(point))
    safe = get_policy(policy).safe_knob
    if safe is None:
        return result
    (row,) = evaluate_knobs(policy, scores, correct, scales, costs, [safe])
    result.details["rule"] = "most accurate"
    return replace(result, policy=policy, knob=float(safe), metrics=_metrics(row))


def _learn_then_test(
    policy: str,
    rows: Sequence[Mapping[str, object]],
    n: int,
    epsilon: float,
    delta: float,
    *,
    largest_scale: float,
    largest_accuracy: float,
    largest_metrics: Mapping[str, object],
) -> TuneResult:
    """The fixed-sequence test and the pick, shared by `tune_to_accuracy_loss` and
    `knob_for_target`: `rows` (knob rows, see `evaluate_knobs`) run from the knob that spends
    most to the one that spends least."""
    losses = np.asarray([int(r["losses"]) for r in rows])
    p_values = binom.cdf(losses, n, epsilon)
    failed = np.flatnonzero(p_values > delta)
    n_certified = int(failed[0]) if failed.size else len(rows)
    target = {"metric": "accuracy_loss", "epsilon": float(epsilon), "delta": float(delta)}
    details = {
        "method": "Learn-then-Test, fixed-sequence, exact binomial tail",
        "loss": "1[largest scale correct and routed scale wrong]",
        "n_calib": n,
        "knobs_tested": min(n_certified + 1, len(rows)),
        "knobs_certified": n_certified,
        "largest_accuracy": largest_accuracy,
    }
    if n_certified == 0:
        details["rule"] = "largest scale"
        return TuneResult("fixed", largest_scale, dict(largest_metrics), target, False, details)
    best = min(range(n_certified), key=lambda j: (float(rows[j]["mean_tokens"]), j))
    metrics = _metrics(rows[best])
    details |= {
        "rule": "certified",
        "p_value": float(p_values[best]),
        "empirical_risk": int(losses[best]) / n,
        "empirical_accuracy_loss": largest_accuracy - metrics["accuracy"],
    }
    return TuneResult(policy, float(rows[best]["knob"]), metrics, target, True, details)


_TARGET = re.compile(
    r"^\s*(tokens|flops|latency|loss)\s*(?:<=|=)\s*([0-9.eE+-]+)"
    r"(?:\s*[@,]\s*(?:delta\s*=\s*)?([0-9.eE+-]+))?\s*$"
)


def parse_target(text: str) -> dict:
    """Parse a CLI target: "tokens<=36", "flops=2e9", "latency=0.05", "loss<=0.01@0.1".

    For "loss" the number after "@" (or ", delta=") is delta (default 0.1).
    """
    m = _TARGET.match(text)
    if m is None:
        raise ValueError(
            f"cannot parse target {text!r}; use tokens<=N, flops<=N, latency<=SECONDS or "
            "loss<=EPSILON@DELTA"
        )
    metric, value, extra = m.group(1), float(m.group(2)), m.group(3)
    if metric == "loss":
        return {"metric": "accuracy_loss", "epsilon": value, "delta": float(extra or 0.1)}
    if extra is not None:
        raise ValueError(f"target {text!r}: only a loss target takes a delta")
    return {"metric": metric, "value": value}


def checked_target(target: str | Mapping[str, object]) -> dict:
    """A target from text (`parse_target`) or a dict, as {"metric", "value"} or
    {"metric": "accuracy_loss", "epsilon", "delta"}; ValueError says what is missing."""
    if isinstance(target, str):
        return parse_target(target)
    if not isinstance(target, Mapping):
        raise ValueError(f"a target is text like 'tokens<=20' or a dict, got {target!r}")
    metric = target.get("metric")
    if metric not in (*COST_KEYS, "accuracy_loss"):
        raise ValueError(
            f"target {dict(target)}: 'metric' must be one of {(*COST_KEYS, 'accuracy_loss')}"
        )
    key = "epsilon" if metric == "accuracy_loss" else "value"
    try:
        if metric == "accuracy_loss":
            return {
                "metric": metric,
                "epsilon": float(target["epsilon"]),  # type: ignore[arg-type]
                "delta": float(target.get("delta", 0.1)),  # type: ignore[arg-type]
            }
        return {"metric": metric, "value": float(target["value"])}  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"target {dict(target)} needs a metric and a number under {key!r}, e.g. "
            "{'metric': 'tokens', 'value': 20} or {'metric': 'accuracy_loss', 'epsilon': 0.01}"
        ) from None


def tune(
    P: np.ndarray | ProbeScores,
    correct: np.ndarray,
    scales: Sequence[int],
    costs: Mapping[str, object] | None,
    target: str | Mapping[str, object],
    policy: str = "threshold",
    uncertified: str = "largest",
) -> TuneResult:
    """Dispatch a parsed or textual target to tune_to_budget / tune_to_accuracy_loss
    (`uncertified` applies to an accuracy loss only)."""
    t = checked_target(target)
    if t["metric"] == "accuracy_loss":
        return tune_to_accuracy_loss(
            P, correct, scales, t["epsilon"], t["delta"], policy, costs, uncertified=uncertified
        )
    return tune_to_budget(P, correct, scales, costs, t["metric"], t["value"], policy)


def calibration_table(
    P: np.ndarray | ProbeScores,
    correct: np.ndarray,
    scales: Sequence[int],
    costs: Mapping[str, object] | None,
    policy: str,
    knobs: Sequence[float] | None = None,
) -> dict:
    """Everything `knob_for_target` needs to answer any budget later, without the labels.

    One `evaluate_knobs` row per knob of a grid fixed in advance (`default_knobs(policy)`
    unless given; for cascade that is the label-free grid, not the confidence quantiles
    `tune_to_budget` sweeps): accuracy, mean tokens / FLOPs / latency (None where `costs`
    lacks them) and `losses`, so Learn-then-Test can be rerun for any epsilon and delta.
    JSON-ready: the router folder keeps it as `calibration.json`, which is how a call-time
    budget works with no labels.
    """
    scales, correct, scores, costs = _checked_inputs(P, correct, scales, costs)
    n, S = correct.shape
    grid = np.unique(np.asarray(default_knobs(policy) if knobs is None else knobs, float))
    return {
        "format": _TABLE_FORMAT,
        "version": _TABLE_VERSION,
        "policy": policy,
        "scales": list(scales),
        "n": int(n),
        "largest_accuracy": float(correct[:, -1].mean()),
        "largest": evaluate_choice(np.full(n, S - 1), correct, costs),
        "token_costs": [float(v) for v in cost_matrix(costs, "tokens", n, S).mean(axis=0)],
        "rows": evaluate_knobs(policy, scores, correct, scales, costs, grid),
    }


def _checked_table(table: Mapping[str, object]) -> tuple[str, tuple[int, ...], int, list[dict]]:
    try:
        if table.get("format") != _TABLE_FORMAT:
            raise ValueError(f"'format' is not {_TABLE_FORMAT!r}")
        if table.get("version") != _TABLE_VERSION:
            raise ValueError(f"unsupported version {table.get('version')!r}")
        policy, n = str(table["policy"]), int(table["n"])
        scales = validate_scales(table["scales"])
        rows = [dict(r) for r in table["rows"]]
        if not rows:
            raise ValueError("it has no rows")
        for r in rows:
            r["knob"], r["losses"] = float(r["knob"]), int(r["losses"])
        float(table["largest_accuracy"])
        dict(table["largest"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"malformed calibration table: {what}") from exc
    return policy, scales, n, rows


def knob_for_target(table: Mapping[str, object], target: str | Mapping[str, object]) -> TuneResult:
    """Answer a budget ("tokens<=20", "flops<=2e9", "latency<=0.01", "loss<=0.01@0.1") from a
    `calibration_table` alone, with the same decision code as `tune_to_budget` and
    `tune_to_accuracy_loss`: on the same arrays and knob grid it returns the same result."""
    t = checked_target(target)
    policy, scales, n, rows = _checked_table(table)
    if t["metric"] == "accuracy_loss":
        epsilon, delta = t["epsilon"], t["delta"]
        if not 0 < epsilon < 1 or not 0 < delta < 1:
            raise ValueError(f"epsilon and delta must lie in (0, 1), got {epsilon}, {delta}")
        by_knob = {r["knob"]: r for r in rows}
        return _learn_then_test(
            policy,
            [by_knob[float(k)] for k in conservative_first(policy, list(by_knob))],
            n,
            epsilon,
            delta,
            largest_scale=float(scales[-1]),
            largest_accuracy=float(table["largest_accuracy"]),
            largest_metrics=dict(table["largest"]),
        )
    return _best_within_budget(rows, policy, t["metric"], t["value"], n)


def save_calibration(table: Mapping[str, object], directory: str | Path) -> Path:
    """Write `calibration.json` into a router folder; returns the file."""
    _checked_table(table)
    path = Path(directory) / CALIBRATION_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, allow_nan=False) + "\n")
    return path


def load_calibration(directory: str | Path) -> dict | None:
    """The router folder's calibration table, or None when it has none (a router can be
    used with its saved knob alone). Raises RouterFileError naming a malformed file."""
    path = Path(directory) / CALIBRATION_JSON
    if not path.is_file():
        return None
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
        _checked_table(table)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise RouterFileError(f"{path}: {exc}") from exc
    return table
