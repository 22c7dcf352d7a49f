"""Oracles computed in hindsight from the correctness matrix: the ceilings a router aims at.

The papers' oracle takes a greedy answer that is right at a small scale at face value. Some are
coin flips: the model's answer distribution there puts the gold answer first by a plurality,
not a majority, so re-asking would be wrong more often than right. `chance_corrected` gives
oracle "A": such an answer counts only where the teacher-forced probability of the gold answer
reaches one half. Routers and fixed scales are still scored on their greedy answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from predictor.features import validate_correct, validate_scales

__all__ = [
    "oracle_scale_index",
    "oracle_point",
    "budgeted_oracle_curve",
    "chance_corrected",
    "plurality_share",
    "LUCK_THRESHOLD",
]

LUCK_THRESHOLD = 0.5
"""P(gold) under which a right greedy answer is a plurality win: re-asked at temperature 1,
the model would give another answer more often than the gold one."""


def oracle_scale_index(correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """M3's oracle: the smallest correct scale per sample.

    A sample wrong at every scale counts at the smallest scale (index 0) and is flagged by
    `any_correct == False`, so the oracle never pays tokens for a lost cause.
    """
    correct = validate_correct(correct)
    any_correct = correct.any(axis=1)
    idx = np.where(any_correct, correct.argmax(axis=1), 0).astype(np.int64)
    return idx, any_correct


def oracle_point(correct: np.ndarray, scales: Sequence[int]) -> tuple[float, float]:
    """(accuracy, mean visual tokens) of the oracle: M3 paper Table 2's 'oracle' row."""
    scales = validate_scales(scales)
    correct = validate_correct(correct, n_scales=len(scales))
    idx, any_correct = oracle_scale_index(correct)
    return float(any_correct.mean()), float(np.asarray(scales, dtype=np.float64)[idx].mean())


def budgeted_oracle_curve(
    correct: np.ndarray,
    cost_per_scale: Sequence[float] | np.ndarray,
    budgets: Sequence[float] | np.ndarray | None = None,
) -> list[tuple[float, float]]:
    """Best accuracy reachable under a mean-cost budget with per-sample scales chosen in hindsight.

    `cost_per_scale` is (S,) or per sample (n, S), non-decreasing in scale. Returns
    (budget, accuracy) pairs: every breakpoint of the frontier when `budgets` is None, else the
    accuracy at each given budget (NaN below the all-smallest cost, which is infeasible).

    Why greedy is optimal: it is a knapsack where every item is worth exactly 1. Start with
    every sample at the smallest scale (the cheapest assignment). Sample i can only count as
    correct at a scale where it is correct, so the cheapest way to make it count costs
    d_i = (cost of its cheapest correct scale) - (cost at the smallest scale) extra, and any
    assignment with k correct samples spends at least the base plus the k smallest d_i. The
    greedy buys exactly the k smallest d_i, so it meets that lower bound for every k. Samples
    never correct have no d_i and stay at the smallest scale.
    """
    correct = validate_correct(correct)
    n, S = correct.shape
    cost = np.asarray(cost_per_scale, dtype=np.float64)
    if cost.shape == (S,):
        cost = np.broadcast_to(cost, (n, S))
    elif cost.shape != (n, S):
        raise ValueError(f"cost_per_scale must have shape ({S},) or ({n}, {S}), got {cost.shape}")
    if n == 0:
        raise ValueError("budgeted_oracle_curve needs at least one sample")
    base = cost[:, 0]
    any_correct = correct.any(axis=1)
    cheapest = np.where(correct, cost, np.inf).min(axis=1)
    d = np.sort(cheapest[any_correct] - base[any_correct])
    spend = base.sum() + np.concatenate([[0.0], np.cumsum(d)])
    # Fewest total cost for at least k correct: a running minimum from the right also covers
    # increments that are negative (a correct scale cheaper than the smallest one).
    need = np.minimum.accumulate(spend[::-1])[::-1] / n
    acc = np.arange(len(need)) / n
    if budgets is None:
        keep = np.r_[need[1:] > need[:-1] + 1e-12, True]  # last k at each distinct budget
        return [(float(b), float(a)) for b, a in zip(need[keep], acc[keep], strict=True)]
    out = []
    for b in np.asarray(budgets, dtype=np.float64).ravel():
        k = int(np.searchsorted(need, b + 1e-12, side="right")) - 1
        out.append((float(b), float(acc[k]) if k >= 0 else float("nan")))
    return out


def _gold(correct: np.ndarray, gold_prob: np.ndarray) -> np.ndarray:
    p = np.asarray(gold_prob, dtype=np.float64)
    if p.shape != correct.shape:
        raise ValueError(f"gold_prob has shape {p.shape}, correct has {correct.shape}")
    return p


def chance_corrected(
    correct: np.ndarray, gold_prob: np.ndarray, threshold: float = LUCK_THRESHOLD
) -> np.ndarray:
    """Oracle A's correctness matrix: right below the largest scale only where P(gold answer)
    >= `threshold` (NaN, unknown, keeps the greedy credit); the largest scale keeps its greedy
    correctness, so the fixed-scale curve it is compared with ends at the same point."""
    correct = validate_correct(correct)
    p = _gold(correct, gold_prob)
    out = correct & ~(p < threshold)
    out[:, -1] = correct[:, -1]
    return out


def plurality_share(
    correct: np.ndarray, gold_prob: np.ndarray, threshold: float = LUCK_THRESHOLD
) -> np.ndarray:
    """(S,) share of the samples right at each scale with P(gold answer) < `threshold`."""
    correct = validate_correct(correct)
    p = _gold(correct, gold_prob)
    return (correct & (p < threshold)).mean(axis=0)
