"""Choose a policy's knob on the calib split: for a cost budget, or for a bounded accuracy loss.

Router (predictor.routers) and calibration (here) are separate, as in RouteLLM's
`routers/` vs `calibrate_threshold.py`: a router gives scores, calibration turns a target
into a knob using labelled calibration data the router was NOT trained on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import binom

from predictor.curves import COST_KEYS, evaluate_choice, sweep
from predictor.features import validate_correct, validate_scales
from predictor.policies import apply_policy, conservative_first, default_knobs, relative_cost

__all__ = [
    "TuneResult",
    "tune_to_budget",
    "tune_to_accuracy_loss",
    "binomial_p_value",
    "parse_target",
    "tune",
]


@dataclass
class TuneResult:
    """The chosen knob, what it achieved on the calib split, and what was asked for.

    `policy` may come back as "fixed" with `knob` = the largest scale: the accuracy-loss
    tuner's answer when it cannot certify any cheaper knob.
    """

    policy: str
    knob: float
    metrics: dict
    target: dict
    certified: bool | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def tune_to_budget(
    P: np.ndarray,
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
    key = f"mean_{target_metric}"
    curve = sweep(policy, P, correct, scales, costs, knobs)
    ok = [p for p in curve if p[key] <= target_value * (1 + 1e-9)]
    if not ok:
        cheapest = min(p[key] for p in curve)
        raise ValueError(
            f"no {policy} knob reaches mean {target_metric} <= {target_value:g} on the calib "
            f"split; the cheapest reaches {cheapest:g}"
        )
    best = max(ok, key=lambda p: (p["accuracy"], -p[key]))
    metrics = {k: v for k, v in best.items() if k != "knob"}
    return TuneResult(
        policy=policy,
        knob=best["knob"],
        metrics=metrics,
        target={"metric": target_metric, "value": float(target_value)},
        details={"n_calib": int(np.shape(correct)[0]), "knobs_tried": len(curve)},
    )


def binomial_p_value(n_losses: int, n: int, epsilon: float) -> float:
    """P(Binomial(n, epsilon) <= n_losses): a valid p-value for H0 "risk > epsilon" with
    {0,1} losses, since a larger risk only makes few losses less likely."""
    return float(binom.cdf(n_losses, n, epsilon))


def tune_to_accuracy_loss(
    P: np.ndarray,
    correct: np.ndarray,
    scales: Sequence[int],
    epsilon: float,
    delta: float,
    policy: str = "threshold",
    costs: Mapping[str, object] | None = None,
    knobs: Sequence[float] | None = None,
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
    come from a model not fitted on these calibration rows. If no knob is certified the
    result is policy "fixed" at the largest scale (loss 0 by definition).
    """
    if not 0 < epsilon < 1 or not 0 < delta < 1:
        raise ValueError(f"epsilon and delta must lie in (0, 1), got {epsilon}, {delta}")
    scales = validate_scales(scales)
    correct = validate_correct(correct, n_scales=len(scales))
    scores = np.asarray(P, dtype=np.float64)
    if scores.shape != correct.shape:
        raise ValueError(f"scores have shape {scores.shape}, correct has {correct.shape}")
    n, S = correct.shape
    costs = dict(costs or {})
    costs.setdefault("tokens", np.asarray(scales, dtype=np.float64))
    util_cost = relative_cost(np.broadcast_to(np.asarray(costs["tokens"], float), (n, S)))
    order = conservative_first(policy, default_knobs(policy) if knobs is None else knobs)
    rows, largest = np.arange(n), correct[:, -1]
    tok = np.broadcast_to(np.asarray(costs["tokens"], dtype=np.float64), (n, S))
    losses, spent, choices = [], [], []
    for k in order:
        idx, tried = apply_policy(policy, scores, float(k), scales, util_cost)
        losses.append(int(np.sum(largest & ~correct[rows, idx])))
        spent.append(float(tok[rows, idx].mean() if tried is None else (tok * tried).sum(1).mean()))
        choices.append((idx, tried))
    p_values = binom.cdf(np.asarray(losses), n, epsilon)
    failed = np.flatnonzero(p_values > delta)
    n_certified = int(failed[0]) if failed.size else len(order)
    target = {"metric": "accuracy_loss", "epsilon": float(epsilon), "delta": float(delta)}
    details = {
        "method": "Learn-then-Test, fixed-sequence, exact binomial tail",
        "loss": "1[largest scale correct and routed scale wrong]",
        "n_calib": n,
        "knobs_tested": min(n_certified + 1, len(order)),
        "knobs_certified": n_certified,
        "largest_accuracy": float(largest.mean()),
    }
    if n_certified == 0:
        metrics = evaluate_choice(np.full(n, S - 1), correct, costs)
        return TuneResult("fixed", float(scales[-1]), metrics, target, False, details)
    best = min(range(n_certified), key=lambda j: (spent[j], j))
    idx, tried = choices[best]
    metrics = evaluate_choice(idx, correct, costs, tried)
    knob = float(order[best])
    details |= {
        "p_value": float(p_values[best]),
        "empirical_risk": losses[best] / n,
        "empirical_accuracy_loss": details["largest_accuracy"] - metrics["accuracy"],
    }
    return TuneResult(policy, knob, metrics, target, True, details)


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


def tune(
    P: np.ndarray,
    correct: np.ndarray,
    scales: Sequence[int],
    costs: Mapping[str, object] | None,
    target: str | Mapping[str, object],
    policy: str = "threshold",
) -> TuneResult:
    """Dispatch a parsed or textual target to tune_to_budget / tune_to_accuracy_loss."""
    t = parse_target(target) if isinstance(target, str) else dict(target)
    if t.get("metric") == "accuracy_loss":
        return tune_to_accuracy_loss(
            P, correct, scales, float(t["epsilon"]), float(t.get("delta", 0.1)), policy, costs
        )
    return tune_to_budget(P, correct, scales, costs, str(t["metric"]), float(t["value"]), policy)
