"""Policies: turn per-scale scores into one scale index per sample (pure numpy).

All policies return scale INDICES into the ascending `scales` tuple; `ScaleRouter.route` maps
them to scale values. Each knob is monotone in how much a policy spends:

- threshold (tau):  higher tau -> larger scales; tau > 1 sends everything to the largest.
- utility (lam):    higher lam -> smaller scales; lam = 0 is argmax P.
- cascade (c):      higher c   -> larger scales; c above every confidence runs every scale.
- quantile (q):     higher q   -> larger scales (oracle-scale classifier baseline).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "POLICIES",
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

POLICIES = ("threshold", "utility", "cascade", "quantile", "fixed")
_SPEND_GROWS_WITH_KNOB = {"threshold": True, "utility": False, "cascade": True, "quantile": True}


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

    `scores` is P(correct) for threshold/utility, answer confidence for cascade, oracle-scale
    class probabilities for quantile. For utility, `cost` defaults to relative tokens.
    For "fixed" the knob is a scale value (e.g. 576), not an index.
    """
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
    if policy == "fixed":
        if scales is None or int(knob) not in scales:
            raise ValueError(f"fixed policy: knob {knob} is not one of the scales {scales}")
        return fixed_policy(scores.shape[0], list(scales).index(int(knob))), None
    raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")


def default_knobs(policy: str, scores: np.ndarray | None = None) -> np.ndarray:
    """A knob grid fixed in advance (never fitted to labels), ending at both extremes.

    Fixed grids matter for the accuracy-loss guarantee: Learn-then-Test needs the candidate
    knobs chosen before the calibration labels are seen. For cascade with `scores` given the
    grid is the confidence quantiles (fine for sweeps; `tune_to_accuracy_loss` never passes
    scores).
    """
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
    elif policy == "quantile":
        grid = np.concatenate([np.linspace(0, 1, 51), [1.01]])
    else:
        raise ValueError(f"policy {policy!r} has no knob grid; choose one of {POLICIES[:4]}")
    return np.unique(grid)


def conservative_first(policy: str, knobs: Sequence[float] | np.ndarray) -> np.ndarray:
    """Knobs ordered from the one that spends most (safest) to the one that spends least."""
    if policy not in _SPEND_GROWS_WITH_KNOB:
        raise ValueError(f"policy {policy!r} has no knob order; choose one of {POLICIES[:4]}")
    k = np.unique(np.asarray(knobs, dtype=np.float64))
    return k[::-1] if _SPEND_GROWS_WITH_KNOB[policy] else k
