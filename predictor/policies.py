"""Policies: turn per-scale scores into one scale index per sample (pure numpy).

`POLICIES` is the one registry of them: what each reads, what its knob is, which way the knob
moves spending, how it is tuned and whether it needs a router. Every other module (the router,
calibration, `AdaptiveLMM`, the CLI) asks it rather than listing names. All policies return
scale INDICES into the ascending `scales` tuple; `ScaleRouter.route` maps them to scale values.

The probe policies route in stages on what the model's own prefill at a small scale says
(`ProbeScores`); `StagedRoute` runs those stages, the same code offline on label arrays and in
`AdaptiveLMM` between generate calls, so a knob calibrated on one means the same in the other.
Whatever a policy runs is paid: they return how many prefills each sample paid at each scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "POLICIES",
    "ROUTER_POLICIES",
    "PROBE_POLICIES",
    "Policy",
    "ProbeScores",
    "StagedRoute",
    "get_policy",
    "threshold_policy",
    "utility_policy",
    "cascade_policy",
    "staged_policy",
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
PROBE = (
    "P(correct) per scale from a probe router on the model's own prefill at each probe scale "
    "(ProbeScores), and a gate router's P(correct) on the free features for probe-cascade"
)


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
    def needs_probe(self) -> bool:
        """Routes on `ProbeScores`: a probe router folder, and prefills at the probe scales."""
        return self.scores == PROBE

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
            "probe",
            PROBE,
            "lam: one prefill at the smallest probe scale for every sample (paid, its answer "
            "not kept), then argmax_s P_s - lam * cost_s / cost_largest on its probe",
            "weight",
            spend_grows_with_knob=False,
            tuning=_BUDGET_OR_LOSS + ", on held-out probe router scores",
            safe_knob=0.0,
        ),
        Policy(
            "probe-cascade",
            PROBE,
            "lam: the gate router starts a sample at the smallest scale when its P(correct) "
            "there reaches the gate threshold, else at argmax over larger s of P_s - lam * "
            "cost_s / cost_largest; at each probe scale a sample is answered at, its probe "
            "keeps the answer or moves it to a larger scale by the same rule (the answer in "
            "hand costs nothing more); every attempt is paid",
            "weight",
            spend_grows_with_knob=False,
            tuning=_BUDGET_OR_LOSS + ", on held-out gate and probe router scores; the gate "
            "threshold from a fixed grid by gap closed on the same scores",
            safe_knob=0.0,
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
PROBE_POLICIES = tuple(name for name, p in POLICIES.items() if p.needs_probe)
"""The policies that route on a probe router folder's `ProbeScores`."""
GATE_THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.01)
"""probe-cascade's gate thresholds, fixed in advance: 0 starts every sample at the smallest
scale (a plain probe cascade), 1.01 none (the gate router alone, probing at the second probe
scale)."""


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


@dataclass(frozen=True)
class ProbeScores:
    """What the probe policies read, per sample.

    `stages` maps each probe scale's INDEX to the (n, S) P(correct at each scale) of the probe
    router on that scale's prefill; `gate` is the (n, S) P(correct) of the gate router on the
    free features and `gate_threshold` its start rule (probe-cascade only). Offline every
    array covers every sample; in serving a stage's rows exist only for the samples that
    reached it (`StagedRoute` asks for no others).
    """

    stages: Mapping[int, np.ndarray]
    gate: np.ndarray | None = None
    gate_threshold: float = 0.0

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("probe scores need at least one probe stage")
        arrays = [_as_2d(P, "probe scores") for P in self.stages.values()]
        if self.gate is not None:
            arrays.append(_as_2d(self.gate, "gate scores"))
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"probe and gate scores differ in shape: {[a.shape for a in arrays]}")
        if any(not 0 <= k < arrays[0].shape[1] for k in self.stages):
            raise ValueError(f"probe stages {sorted(self.stages)} are not scale indices")

    @property
    def shape(self) -> tuple[int, int]:
        return next(iter(self.stages.values())).shape

    def with_threshold(self, gate_threshold: float) -> ProbeScores:
        return ProbeScores(self.stages, self.gate, float(gate_threshold))


class StagedRoute:
    """One pass of a probe policy over n samples, stage by stage.

    `at(k)` lists the samples to prefill at scale index k (a probe stage) and `observe` takes
    the probe router's P(correct) for them; `remaining()` lists those still to be answered,
    at `current`; `finish()` returns (chosen index (n,), prefills paid (n, S) int). Offline
    `apply_policy` feeds it label arrays; `AdaptiveLMM` feeds it between generate calls.

    probe: every sample is prefilled once at the first stage, a probe whose answer is not
    kept, then answered at argmax_s P_s - lam * cost_s. probe-cascade: the gate picks where a
    sample starts (see `POLICIES`); at each stage it is answered at, argmax over s >= k of
    P_s - lam * extra_s with extra_k = 0 (the answer in hand) keeps it or moves it up.
    """

    def __init__(
        self,
        policy: str,
        cost: np.ndarray,
        lam: float,
        stages: Sequence[int],
        gate: np.ndarray | None = None,
        gate_threshold: float = 0.0,
    ) -> None:
        if get_policy(policy).scores != PROBE:
            raise ValueError(f"a staged route runs {PROBE_POLICIES}, not {policy!r}")
        self.policy, self.lam = policy, float(lam)
        self.cost = _as_2d(cost, "cost")
        n, S = self.cost.shape
        self.stages = tuple(sorted(int(k) for k in stages))[: 1 if policy == "probe" else None]
        self.paid = np.zeros((n, S), dtype=np.int64)
        self.answered = np.zeros(n, dtype=bool)
        if policy == "probe":
            self.current = np.full(n, self.stages[0], dtype=np.int64)
        else:
            if gate is None:
                raise ValueError("probe-cascade needs the gate router's scores")
            gate = _as_2d(gate, "gate scores")
            util = gate[:, 1:] - self.lam * self.cost[:, 1:]
            direct = 1 + np.argmax(util, axis=1) if S > 1 else np.zeros(n, dtype=np.int64)
            self.current = np.where(gate[:, 0] >= gate_threshold, 0, direct).astype(np.int64)

    def at(self, k: int) -> np.ndarray:
        """Samples to prefill at stage k now (call stages in ascending order)."""
        return np.flatnonzero((self.current == k) & ~self.answered)

    def observe(self, k: int, rows: np.ndarray, P: np.ndarray) -> None:
        """The stage-k prefill of `rows` ran; `P` is their probe router's (len(rows), S)."""
        rows = np.asarray(rows, dtype=np.int64)
        P = _as_2d(P, "probe scores")
        if P.shape != (len(rows), self.cost.shape[1]):
            raise ValueError(f"stage {k}: scores of shape {P.shape} for {len(rows)} samples")
        self.paid[rows, k] += 1
        extra = self.cost[rows].copy()
        if self.policy == "probe":
            self.current[rows] = np.argmax(P - self.lam * extra, axis=1)
            return
        extra[:, k] = 0.0
        util = P - self.lam * extra
        util[:, :k] = -np.inf
        nxt = np.argmax(util, axis=1)
        self.answered[rows[nxt == k]] = True
        self.current[rows] = nxt

    def remaining(self) -> np.ndarray:
        """Samples to answer at `current` after the stages."""
        return np.flatnonzero(~self.answered)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        rest = self.remaining()
        self.paid[rest, self.current[rest]] += 1
        self.answered[rest] = True
        return self.current.copy(), self.paid.copy()


def staged_policy(
    policy: str, scores: ProbeScores, cost: np.ndarray, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """A probe policy on full arrays: (chosen index (n,), prefills paid (n, S))."""
    n, S = scores.shape
    cost = np.broadcast_to(np.asarray(cost, dtype=np.float64), (n, S))
    route = StagedRoute(policy, cost, lam, list(scores.stages), scores.gate, scores.gate_threshold)
    for k in route.stages:
        rows = route.at(k)
        route.observe(k, rows, np.asarray(scores.stages[k], dtype=np.float64)[rows])
    return route.finish()


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
    scores: np.ndarray | ProbeScores,
    knob: float,
    scales: Sequence[int] | None = None,
    cost: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Dispatch by name; returns (chosen index, prefills paid per scale or None when only the
    chosen scale ran): a bool mask from the cascade, counts from the probe policies.

    `scores` is what `POLICIES[policy].scores` says (`ProbeScores` for the probe policies);
    the knob is checked against what `POLICIES[policy].knob` says it is (a scale value for
    "fixed", a finite number otherwise). For a cost-weight knob, `cost` defaults to relative
    tokens.
    """
    entry = get_policy(policy)
    knob = entry.check_knob(knob, scales)
    if entry.knob_kind == "weight" and cost is None:
        if scales is None:
            raise ValueError(f"{policy} policy needs scales or a cost vector")
        cost = relative_cost(scales)
    if entry.needs_probe:
        if not isinstance(scores, ProbeScores):
            raise ValueError(f"{policy} policy reads ProbeScores, got {type(scores).__name__}")
        return staged_policy(policy, scores, cost, knob)  # type: ignore[arg-type]
    if isinstance(scores, ProbeScores):
        raise ValueError(f"{policy} policy reads one (n, S) array, not ProbeScores")
    scores = _as_2d(scores, "scores")
    if policy == "threshold":
        return threshold_policy(scores, scales, knob), None
    if policy == "utility":
        return utility_policy(scores, cost, knob), None  # type: ignore[arg-type]
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
    entry = _tunable(policy)
    if policy == "threshold":
        grid = np.concatenate([np.linspace(0, 1, 101), 1 - np.logspace(-4, -2, 7), [1.01]])
    elif entry.knob_kind == "weight":
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
