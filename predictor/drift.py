"""Drift monitor: is recent traffic still like the calibration data the router was tuned on?

Every tuned knob, and Learn-then-Test's accuracy guarantee, assume new samples come from the
calibration distribution. Images JPEG-compressed at quality 30 cost the shipped model 15
points at its largest scale while barely 1 % of them leave the router's training feature
range, so a range check stays silent; this module tests the distribution instead.

The router folder keeps `drift.json`, summary statistics of the calibration split: per feature
group, its mean, top principal components and quantiles of each component and of what lies
off them; quantiles of the router's chosen scale and of the answer confidence at the smallest
scale. Recent traffic is compared with them by a windowed two-sample test:

- features are grouped by name prefix (`v1_*` image, `q_*` question): a shift of the images
  alone is not diluted by unchanged question columns;
- each sample becomes a few univariate statistics: its projection on each component, its
  distance off them (a shift orthogonal to the components still shows; its reference is
  cross-fitted and only a larger distance counts, since rows the components were fitted on
  sit closer to them than new ones from the same distribution), the router's chosen
  scale index, and, where that scale ran, the confidence at the smallest scale;
- each statistic gets a two-sample Kolmogorov-Smirnov test, window against calibration
  quantiles, p-values from the Kolmogorov distribution; samples repeated inside one feature
  group (one image, several questions) count once, so clustered traffic is not over-trusted;
- the p-values are combined by Bonferroni. `score` is the KS distance of the most significant
  statistic (0: same distribution, 1: disjoint); `drifted` when the combined p < `alpha`.

Why this and not MMD or a classifier two-sample test: both need calibration rows in the router
folder and more work per window; reduced dimensions plus univariate KS with Bonferroni detect
shift about as well in Rabanser et al. ("Failing Loudly", NeurIPS 2019), and the summary is a
few kilobytes and one matrix product per window. Pure numpy; the caller computes features.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from predictor.policies import apply_policy, relative_cost
from predictor.serving import RouterFileError

__all__ = [
    "DRIFT_JSON",
    "DriftMonitor",
    "DriftReference",
    "DriftReport",
    "DriftWarning",
    "drift_reference",
    "load_drift_reference",
    "save_drift_reference",
]

DRIFT_JSON = "drift.json"
_FORMAT, _VERSION = "adaptive-m3/drift-reference", 1
_LEVELS = np.linspace(0.0, 1.0, 101)
DEFAULT_ALPHA = 1e-3
"""Combined p-value under which a window counts as drifted: strict, since a serving process
tests a new window after every call."""


class DriftWarning(UserWarning):
    """Recent inputs no longer look like the data the router was calibrated on."""


@dataclass
class FeatureGroup:
    """One group of feature columns: its mean, top principal components, and the quantiles of
    each projection and of the distance off the components over the calibration split."""

    name: str
    columns: list[int]
    mean: list[float]
    components: list[list[float]]
    quantiles: list[list[float]]
    distinct: int

    def statistics(self, X: np.ndarray) -> np.ndarray:
        """(n, k + 1): projections on the k components, then the residual norm."""
        centred = X[:, self.columns].astype(np.float64) - np.asarray(self.mean)
        W = np.asarray(self.components, dtype=np.float64).reshape(-1, len(self.columns))
        projected = centred @ W.T
        residual = np.linalg.norm(centred - projected @ W, axis=1)
        return np.column_stack([projected, residual])

    @property
    def labels(self) -> list[str]:
        return [f"{self.name} component {i + 1}" for i in range(len(self.components))] + [
            f"{self.name} off-component distance"
        ]


@dataclass
class DriftReference:
    """Summary statistics of the calibration data (`drift.json` in a router folder)."""

    n: int
    scales: list[int]
    feature_names: list[str]
    groups: list[FeatureGroup]
    chosen_shares: list[float]
    confidence_quantiles: list[float] | None = None
    policy: str = ""
    knob: float = float("nan")

    @property
    def width(self) -> int:
        return len(self.feature_names)

    @property
    def labels(self) -> list[str]:
        """Name of each column of `statistics`."""
        return [label for g in self.groups for label in g.labels] + [
            "chosen scale",
            "confidence at the smallest scale",
        ]

    def statistics(
        self,
        X: np.ndarray,
        chosen: Sequence[int] | np.ndarray,
        confidence: Sequence[float] | np.ndarray | None = None,
    ) -> np.ndarray:
        """(n, m) per-sample statistics the test compares: each group's projections and
        residual, the chosen scale's index, the smallest-scale confidence (NaN: not run)."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.width:
            raise ValueError(
                f"drift reference expects {self.width} features, got shape {np.shape(X)}"
            )
        index = {s: j for j, s in enumerate(self.scales)}
        chosen = np.asarray(chosen).reshape(-1)
        unknown = sorted({int(s) for s in chosen} - set(index))
        if unknown:
            raise ValueError(f"chosen scales {unknown} are not the reference's {self.scales}")
        conf = np.full(len(X), np.nan) if confidence is None else np.asarray(confidence, float)
        if len(chosen) != len(X) or conf.shape != (len(X),):
            raise ValueError("features, chosen scales and confidences must have one row each")
        columns = [g.statistics(X) for g in self.groups]
        columns += [np.asarray([index[int(s)] for s in chosen], float)[:, None], conf[:, None]]
        return np.hstack(columns)

    def test(self, stats: np.ndarray, alpha: float = DEFAULT_ALPHA) -> DriftReport:
        """The windowed two-sample test of `statistics` rows against this reference."""
        stats = np.asarray(stats, dtype=np.float64).reshape(-1, len(self.labels))
        results = []
        start = 0
        for group in self.groups:
            block = stats[:, start : start + len(group.labels)]
            distinct = len(np.unique(block, axis=0)) if len(block) else 0
            for j, label in enumerate(group.labels):
                residual = j == len(group.labels) - 1
                d = _ks_distance(block[:, j], np.asarray(group.quantiles[j]), residual)
                results.append((label, d, _ks_p(d, distinct, group.distinct)))
            start += len(group.labels)
        chosen = stats[:, start]
        if len(chosen):
            window = np.bincount(chosen.astype(int), minlength=len(self.scales)) / len(chosen)
            d = float(np.max(np.abs(np.cumsum(window) - np.cumsum(self.chosen_shares))))
            results.append(("chosen scale", d, _ks_p(d, len(chosen), self.n)))
        confidence = stats[:, start + 1]
        confidence = confidence[np.isfinite(confidence)]
        if self.confidence_quantiles is not None and len(confidence):
            d = _ks_distance(confidence, np.asarray(self.confidence_quantiles))
            results.append(
                ("confidence at the smallest scale", d, _ks_p(d, len(confidence), self.n))
            )
        return DriftReport.from_tests(len(stats), results, alpha)

    def to_dict(self) -> dict:
        knob = float(self.knob)
        return {
            "format": _FORMAT,
            "version": _VERSION,
            **asdict(self),
            "knob": knob if math.isfinite(knob) else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> DriftReference:
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"'format' is not {_FORMAT!r}")
        if data.get("version") != _VERSION:
            raise ValueError(f"unsupported version {data.get('version')!r}")
        values = {k: v for k, v in data.items() if k not in ("format", "version")}
        values["groups"] = [FeatureGroup(**g) for g in values["groups"]]
        values["knob"] = float("nan") if values.get("knob") is None else float(values["knob"])
        reference = cls(**values)
        if sum(len(g.columns) for g in reference.groups) != reference.width:
            raise ValueError("feature groups do not cover the features")
        if len(reference.chosen_shares) != len(reference.scales):
            raise ValueError("chosen_shares needs one share per scale")
        return reference


@dataclass
class DriftReport:
    """One test's outcome: `score` (KS distance of the most significant statistic), `p_value`
    (Bonferroni over `tests`), `drifted`, the window size `n` and the three strongest tests."""

    n: int
    score: float
    p_value: float
    drifted: bool
    alpha: float
    strongest: list[dict] = field(default_factory=list)

    @classmethod
    def from_tests(cls, n: int, results: list[tuple[str, float, float]], alpha: float):
        if not results or n == 0:
            return cls(n, 0.0, 1.0, False, alpha)
        ranked = sorted(results, key=lambda r: (r[2], -r[1]))
        p = min(1.0, ranked[0][2] * len(results))
        strongest = [{"statistic": s, "ks": round(d, 4), "p": p_} for s, d, p_ in ranked[:3]]
        return cls(n, float(ranked[0][1]), p, bool(p < alpha), alpha, strongest)

    def to_dict(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        top = self.strongest[0]["statistic"] if self.strongest else "-"
        return (
            f"router inputs have drifted from the calibration data: drift score "
            f"{self.score:.2f} (KS distance of {top}), p = {self.p_value:.1e} over {self.n} "
            "samples. The tuned knob and its accuracy guarantee assume calibration-like data; "
            "re-label a sample of this traffic and retune, or serve conservatively."
        )


class DriftMonitor:
    """A window of the latest `window` samples' statistics, tested after every update.

    Fewer than `min_samples` samples in the window report no drift: a KS test on a handful of
    samples cannot tell shift from chance. `warn()` warns once per monitor.
    """

    def __init__(
        self,
        reference: DriftReference,
        window: int = 512,
        min_samples: int = 64,
        alpha: float = DEFAULT_ALPHA,
    ) -> None:
        if window < min_samples or min_samples < 1:
            raise ValueError(f"need window >= min_samples >= 1, got {window}, {min_samples}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        self.reference = reference
        self.window, self.min_samples, self.alpha = window, min_samples, alpha
        self.rows = np.empty((0, len(reference.labels)))
        self.warned = False

    def add(self, stats: np.ndarray) -> None:
        self.rows = np.vstack([self.rows, stats])[-self.window :]

    def set_confidence(self, confidence: np.ndarray) -> None:
        """Fill the smallest-scale confidence of the latest len(confidence) samples."""
        confidence = np.asarray(confidence, dtype=np.float64)
        if len(confidence):
            self.rows[-len(confidence) :, -1] = confidence[-len(self.rows) :]

    def report(self) -> DriftReport:
        if len(self.rows) < self.min_samples:
            return DriftReport(len(self.rows), 0.0, 1.0, False, self.alpha)
        return self.reference.test(self.rows, self.alpha)

    def warn(self, report: DriftReport, action: str = "", stacklevel: int = 2) -> None:
        """A `DriftWarning` the first time `report` is drifted; `action` ends its message."""
        if report.drifted and not self.warned:
            self.warned = True
            warnings.warn(report.message() + action, DriftWarning, stacklevel=stacklevel + 1)


def drift_reference(
    X: np.ndarray,
    feature_names: Sequence[str],
    scales: Sequence[int],
    P: np.ndarray,
    policy: str,
    knob: float,
    token_costs: Sequence[float] | np.ndarray | None = None,
    confidence: np.ndarray | None = None,
    components: int = 8,
) -> DriftReference:
    """Summarise the calibration split: features `X`, the router's held-out scores `P` (the
    scales its tuned `policy`/`knob` choose from them are what new traffic is compared with:
    in-sample scores would choose too well), and the answer `confidence` at the smallest
    scale."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(feature_names) or len(X) < 2:
        raise ValueError(f"need (n >= 2, {len(feature_names)}) features, got {X.shape}")
    groups = []
    for name, columns in _groups(feature_names).items():
        block = X[:, columns]
        mean = block.mean(axis=0)
        _, _, Vt = np.linalg.svd(block - mean, full_matrices=False)
        group = FeatureGroup(name, columns, mean.tolist(), Vt[:components].tolist(), [], 0)
        stats = group.statistics(X)
        stats[:, -1] = _cross_fitted_residual(block, components)
        group.quantiles = np.quantile(stats, _LEVELS, axis=0).T.tolist()
        group.distinct = len(np.unique(block, axis=0))
        groups.append(group)
    cost = relative_cost(scales if token_costs is None else token_costs)
    if policy == "utility":
        chosen, _ = apply_policy(policy, P, float(knob), scales, cost)
    else:
        chosen, _ = apply_policy(policy, P, float(knob), scales)
    shares = np.bincount(chosen, minlength=len(scales)) / len(chosen)
    conf = None
    if confidence is not None:
        values = np.asarray(confidence, dtype=np.float64)
        values = values[np.isfinite(values)]
        conf = np.quantile(values, _LEVELS).tolist() if len(values) else None
    return DriftReference(
        n=len(X),
        scales=[int(s) for s in scales],
        feature_names=[str(n) for n in feature_names],
        groups=groups,
        chosen_shares=shares.tolist(),
        confidence_quantiles=conf,
        policy=policy,
        knob=float(knob),
    )


def save_drift_reference(reference: DriftReference, directory: str | Path) -> Path:
    path = Path(directory) / DRIFT_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(reference.to_dict()) + "\n")
    return path


def load_drift_reference(directory: str | Path) -> DriftReference | None:
    """The router folder's drift reference, or None when it has none (routers tuned before
    drift monitoring); RouterFileError names a malformed file."""
    path = Path(directory) / DRIFT_JSON
    if not path.is_file():
        return None
    try:
        return DriftReference.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RouterFileError(f"{path}: malformed drift reference: {exc}") from exc


def _groups(names: Sequence[str]) -> dict[str, list[int]]:
    """Columns by name prefix before the last "_" ("v1_3" -> "v1"); names without one form a
    single group."""
    groups: dict[str, list[int]] = {}
    for j, name in enumerate(names):
        prefix = name.rsplit("_", 1)[0] if "_" in name else "features"
        groups.setdefault(prefix, []).append(j)
    return groups


def _cross_fitted_residual(block: np.ndarray, components: int) -> np.ndarray:
    """Each row's distance off components fitted on the other half of the distinct rows.

    In the rows the components were fitted on, that distance is optimistically small: on a
    48-sample calib split every new sample lay beyond all of them. Halves of the distinct rows
    keep an image's repeated questions on one side."""
    distinct, inverse = np.unique(block, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(distinct) < 2:
        return np.zeros(len(block))
    half = np.arange(len(distinct)) % 2
    residual = np.empty(len(block))
    for side in (0, 1):
        fit = distinct[half != side]
        mean = fit.mean(axis=0)
        _, _, Vt = np.linalg.svd(fit - mean, full_matrices=False)
        W = Vt[:components]
        rows = half[inverse] == side
        centred = block[rows] - mean
        residual[rows] = np.linalg.norm(centred - centred @ W.T @ W, axis=1)
    return residual


def _ks_distance(sample: np.ndarray, quantiles: np.ndarray, larger_only: bool = False) -> float:
    """sup |F_window - F_reference|, the reference CDF read off its quantiles (error <= 0.5 %);
    evaluated at every jump of either, so atoms (repeated values) are handled."""
    sample = np.sort(sample[np.isfinite(sample)])
    if not len(sample):
        return 0.0
    points = np.concatenate([sample, quantiles])
    window = np.searchsorted(sample, points, side="right") / len(sample)
    below = np.searchsorted(quantiles, points, side="right")
    reference = np.clip((below - 0.5) / (len(quantiles) - 1), 0.0, 1.0)
    reference[below == 0] = 0.0
    if larger_only:  # only values larger than the reference's count as drift
        return float(max(0.0, np.max(reference - window)))
    return float(np.max(np.abs(window - reference)))


def _ks_p(d: float, n: int, m: int) -> float:
    """Two-sample KS p-value from the Kolmogorov distribution (Stephens' small-n correction)."""
    if n < 1 or m < 1 or d <= 0:
        return 1.0
    e = math.sqrt(n * m / (n + m))
    lam = (e + 0.12 + 0.11 / e) * d
    if lam < 0.2:
        return 1.0
    k = np.arange(1, 101)
    p = 2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * k**2 * lam**2))
    return float(min(1.0, max(0.0, p)))
