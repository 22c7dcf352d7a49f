"""Policies: turn per-scale scores into one scale index per sample (pure numpy).

`POLICIES` is the one registry of them: what each reads, what its knob is, which way the knob
moves spending, how it is tuned and whether it needs a router. Every other module (the router,
calibration, `AdaptiveLMM`, the CLI) asks it rather than listing names. All policies return
scale INDICES into the ascending `scales` tuple; `ScaleRouter.route` maps them to scale values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "POLICIES",
    "ROUTER_POLICIES",
    "Policy",
    "get_policy",
    "threshold_policy",
    "utility_policy",
    "cascade_policy",
    "quantile_policy",
    "fixed_policy",
    "random_policy",
    "apply_policy",
    "default_knobs",
    "conservative_first",
    "relative_cost",
]

P_CORRECT = "P(correct) per scale, from a ScaleRouter"
CONFIDENCE = "the answer's confidence per scale (mean token log-probability)"
ORACLE_CLASS = "P(each scale is the oracle scale), from an OracleScaleClassifier"


@dataclass(frozen=True)
class Policy:
    """One policy and its knob.

    `knob_kind` says what the knob is: a "threshold" on the scores, a cost "weight", a
    "quantile" of a class distribution, or a "scale" (the visual tokens themselves; only
    "fixed", whose knob is what it serves, not something to tune). `spend_grows_with_knob` is
    None for a knob that is not tuned. `safe_knob` is the policy's most accurate setting, what
    serves when no knob meets a target, or None where it has none.
    """

    name: str
    scores: str | None
    knob: str
    knob_kind: str
    spend_grows_with_knob: bool | None
    tuning: str
    safe_knob: float | None = None

    @property
    def needs_router(self) -> bool:
        return self.scores == P_CORRECT

    @property
    def tunable(self) -> bool:
        return self.spend_grows_with_knob is not None

    def check_knob(self, knob: object, scales: Sequence[int] | None = None) -> float:
        """The knob as a float, or ValueError saying what this policy's knob must be."""
        try:
            value = math.nan if isinstance(knob, bool) else float(knob)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(
                f"{self.name} policy: the knob must be a finite number ({self.knob}), got "
                f"{knob!r}; tune the router or pass a knob"
            )
        if self.knob_kind == "scale" and (scales is None or value not in scales):
            raise ValueError(
                f"{self.name} policy: knob {value:g} is not one of the scales {scales}"
            )
        return value


_BUDGET_OR_LOSS = (
    "on the calib split: the best accuracy within a mean-cost budget, or the cheapest knob "
    "Learn-then-Test certifies for an accuracy loss (`tune`, `calibration_table`)"
)
POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy(
            "threshold",
            P_CORRECT,
            "tau: the smallest scale with P(correct) >= tau serves, else the largest",
            "threshold",
            spend_grows_with_knob=True,
            tuning=_BUDGET_OR_LOSS + ", on held-out router scores",
            safe_knob=1.0,
        ),
        Policy(
            "utility",
            P_CORRECT,
            "lam: argmax_s P_s - lam * cost_s / cost_largest; 0 is argmax P",
            "weight",
            spend_grows_with_knob=False,
            tuning=_BUDGET_OR_LOSS + ", on held-out router scores",
            safe_knob=0.0,
        ),
        Policy(
            "cascade",
            CONFIDENCE,
            "c: go one scale up while the answer's confidence < c, paying every attempt",
            "threshold",
            spend_grows_with_knob=True,
            tuning=_BUDGET_OR_LOSS + ", on the answers' confidences",
        ),
        Policy(
            "quantile",
            ORACLE_CLASS,
            "q: the smallest scale whose cumulative oracle-scale probability reaches q",
            "quantile",
            spend_grows_with_knob=True,
            tuning="swept for comparison only (the oracle-scale classifier baseline)",
        ),
        Policy(
            "fixed",
            None,
            "the scale itself: every sample at that many visual tokens",
            "scale",
            spend_grows_with_knob=None,
            tuning="not tuned; the accuracy-loss tuner answers it at the largest scale when it "
            "certifies no cheaper knob",
        ),
    )
}
ROUTER_POLICIES = tuple(name for name, p in POLICIES.items() if p.needs_router)
"""The policies that route on a ScaleRouter's P(correct): the ones `tune` and the CLI offer."""


def get_policy(name: str) -> Policy:
    """The registry entry, or ValueError listing the known policies."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {tuple(POLICIES)}")
    return POLICIES[name]


def _tunable(name: str) -> Policy:
    policy = get_policy(name)
    if not policy.tunable:
        tunable = tuple(n for n, p in POLICIES.items() if p.tunable)
        raise ValueError(f"policy {name!r} has no knob to tune; choose one of {tunable}")
    return policy


def _as_2d(P: np.ndarray, name: str) -> np.ndarray:
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or P.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D (n, S) array, got shape {P.shape}")
    return P


def threshold_policy(P: np.ndarray, scales: Sequence[int] | None, tau: float) -> np.ndarray:
    """Smallest scale whose P(correct) >= tau, else the largest.

    Does not need P to be monotone in scale: it asks "is this scale good enough?" in order of
    cost, which is exactly the oracle-scale definition with P standing in for the label.
    """
    P = _as_2d(P, "P")
    if scales is not None and len(scales) != P.shape[1]:
        raise ValueError(f"P has {P.shape[1]} columns but there are {len(scales)} scales")
    ok = np.greater_equal(P, tau)
    return np.where(ok.any(axis=1), ok.argmax(axis=1), P.shape[1] - 1).astype(np.int64)


def utility_policy(P: np.ndarray, cost: np.ndarray, lam: float) -> np.ndarray:
    """argmax_s P_s - lam * cost_s; cost is (S,) or per-sample (n, S). Ties go to the cheaper."""
    P = _as_2d(P, "P")
    cost = np.asarray(cost, dtype=np.float64)
    if cost.shape not in ((P.shape[1],), P.shape):
        raise ValueError(f"cost must have shape ({P.shape[1]},) or {P.shape}, got {cost.shape}")
    return np.argmax(P - lam * cost, axis=1).astype(np.int64)


def cascade_policy(confidence: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Start at the smallest scale and go up while the answer's confidence < c.

    Returns (chosen index (n,), tried bool (n, S)). `tried` marks every scale that was run,
    so costs count every attempt: a cascade that ran 1, 9 then 36 paid all three prefills.
    """
    conf = _as_2d(confidence, "confidence")
    n, S = conf.shape
    stop = conf >= c
    idx = np.where(stop.any(axis=1), stop.argmax(axis=1), S - 1).astype(np.int64)
    tried = np.arange(S)[None, :] <= idx[:, None]
    return idx, tried


def quantile_policy(P_class: np.ndarray, q: float) -> np.ndarray:
    """Smallest scale whose cumulative oracle-scale probability reaches q (0.5: the median)."""
    P = _as_2d(P_class, "P_class")
    cdf = np.cumsum(P, axis=1)
    ok = cdf >= q - 1e-12
    return np.where(ok.any(axis=1), ok.argmax(axis=1), P.shape[1] - 1).astype(np.int64)


def fixed_policy(n: int, index: int) -> np.ndarray:
    """Every sample at one scale index (negative indices count from the largest)."""
    return np.full(int(n), int(index), dtype=np.int64)


def random_policy(
    n: int, n_scales: int, probs: Sequence[float] | None = None, seed: int = 0
) -> np.ndarray:
    """Each sample at a scale drawn independently with `probs` (uniform by default).

    Mixing fixed scales at random reaches every point on the line between them, which is why
    the fixed-scale baseline curve in `gap_closed` is interpolated linearly.
    """
    rng = np.random.default_rng(seed)
    p = None if probs is None else np.asarray(probs, dtype=np.float64)
    if p is not None and (p.shape != (n_scales,) or np.any(p < 0) or not np.isclose(p.sum(), 1)):
        raise ValueError(f"probs must be {n_scales} non-negative numbers summing to 1, got {probs}")
    return rng.choice(n_scales, size=int(n), p=p).astype(np.int64)


def relative_cost(cost: Sequence[float] | np.ndarray) -> np.ndarray:
    """Cost divided by the largest scale's, so `lam` reads as P-points per largest-scale cost."""
    cost = np.asarray(cost, dtype=np.float64)
    top = cost[..., -1:]
    if np.any(top <= 0):
        raise ValueError("the largest scale's cost must be positive")
    return cost / top


def apply_policy(
    policy: str,
    scores: np.ndarray,
    knob: float,
    scales: Sequence[int] | None = None,
    cost: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Dispatch by name; returns (chosen index, tried mask or None when only one scale ran).

    `scores` is what `POLICIES[policy].scores` says; the knob is checked against what
    `POLICIES[policy].knob` says it is (a scale value for "fixed", a finite number otherwise).
    For utility, `cost` defaults to relative tokens.
    """
    knob = get_policy(policy).check_knob(knob, scales)
    scores = _as_2d(scores, "scores")
    if policy == "threshold":
        return threshold_policy(scores, scales, knob), None
    if policy == "utility":
        if cost is None:
            if scales is None:
                raise ValueError("utility policy needs scales or a cost vector")
            cost = relative_cost(scales)
        return utility_policy(scores, cost, knob), None
    if policy == "cascade":
        return cascade_policy(scores, knob)
    if policy == "quantile":
        return quantile_policy(scores, knob), None
    return fixed_policy(scores.shape[0], list(scales).index(int(knob))), None  # type: ignore[arg-type]


def default_knobs(policy: str, scores: np.ndarray | None = None) -> np.ndarray:
    """A knob grid fixed in advance (never fitted to labels), ending at both extremes.

    Fixed grids matter for the accuracy-loss guarantee: Learn-then-Test needs the candidate
    knobs chosen before the calibration labels are seen. For cascade with `scores` given the
    grid is the confidence quantiles (fine for sweeps; `tune_to_accuracy_loss` never passes
    scores).
    """
    _tunable(policy)
    if policy == "threshold":
        grid = np.concatenate([np.linspace(0, 1, 101), 1 - np.logspace(-4, -2, 7), [1.01]])
    elif policy == "utility":
        grid = np.concatenate([[0.0], np.logspace(-3, 3, 121)])
    elif policy == "cascade":
        if scores is not None:
            q = np.quantile(np.asarray(scores, dtype=np.float64), np.linspace(0, 1, 101))
            grid = np.concatenate([q, [float(np.max(scores)) + 1.0]])
        else:
            grid = np.concatenate([-np.logspace(-4, 1.5, 111), [0.0, 1.01]])
    else:  # quantile
        grid = np.concatenate([np.linspace(0, 1, 51), [1.01]])
    return np.unique(grid)


def conservative_first(policy: str, knobs: Sequence[float] | np.ndarray) -> np.ndarray:
    """Knobs ordered from the one that spends most (safest) to the one that spends least."""
    k = np.unique(np.asarray(knobs, dtype=np.float64))
    return k[::-1] if _tunable(policy).spend_grows_with_knob else k
