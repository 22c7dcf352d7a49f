"""Router feature contract: width, names and the training range, plus input validation.

The router only ever sees a float32 matrix X of shape (n, F). What the columns mean is decided
by m3core; this module makes sure a router is never fed something it was not trained on
without a clear error (wrong width, NaN/inf) or, if asked, a safe fallback (out of range).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["FeatureSpec", "validate_features", "validate_scales", "validate_correct"]

_MAX_LISTED = 8


def _listed(idx: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:_MAX_LISTED])
    more = f" and {len(idx) - _MAX_LISTED} more" if len(idx) > _MAX_LISTED else ""
    return f"[{shown}]{more}"


@dataclass(frozen=True)
class FeatureSpec:
    """What a router was trained on, kept so it can refuse or flag unfamiliar inputs.

    `margin` widens the training range on both sides by that fraction of its width before a
    value counts as out of range (0.1: a feature seen in [0, 1] may go to [-0.1, 1.1]).
    """

    width: int
    names: tuple[str, ...]
    minimum: tuple[float, ...]
    maximum: tuple[float, ...]
    margin: float = 0.1
    dtype: str = field(default="float32")

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"feature width must be >= 1, got {self.width}")
        for name, seq in (("names", self.names), ("minimum", self.minimum)):
            if len(seq) != self.width:
                raise ValueError(
                    f"feature spec: {name} has {len(seq)} entries, width is {self.width}"
                )
        if len(self.maximum) != self.width:
            raise ValueError(
                f"feature spec: maximum has {len(self.maximum)} entries, width is {self.width}"
            )
        if self.margin < 0:
            raise ValueError(f"feature spec: margin must be >= 0, got {self.margin}")

    @classmethod
    def from_training(
        cls, X: np.ndarray, names: Sequence[str] | None = None, margin: float = 0.1
    ) -> FeatureSpec:
        """Record width, names and per-feature min/max of (already validated) training data."""
        X = np.asarray(X)
        width = X.shape[1]
        if names is None:
            names = [f"f{j}" for j in range(width)]
        names = tuple(str(n) for n in names)
        if len(names) != width:
            raise ValueError(f"feature_names has {len(names)} entries but X has {width} columns")
        if len(set(names)) != width:
            raise ValueError("feature_names must be unique")
        return cls(
            width=width,
            names=names,
            minimum=tuple(float(v) for v in X.min(axis=0)),
            maximum=tuple(float(v) for v in X.max(axis=0)),
            margin=float(margin),
        )

    def out_of_range(self, X: np.ndarray) -> np.ndarray:
        """Bool (n,): rows with any feature outside [min - m*w, max + m*w], w = max - min."""
        lo = np.asarray(self.minimum, dtype=np.float64)
        hi = np.asarray(self.maximum, dtype=np.float64)
        slack = self.margin * (hi - lo)
        x = np.asarray(X, dtype=np.float64)
        return np.any((x < lo - slack) | (x > hi + slack), axis=1)

    def to_dict(self) -> dict:
        return {
            "width": self.width,
            "names": list(self.names),
            "min": list(self.minimum),
            "max": list(self.maximum),
            "margin": self.margin,
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(
            width=int(d["width"]),
            names=tuple(str(n) for n in d["names"]),
            minimum=tuple(float(v) for v in d["min"]),
            maximum=tuple(float(v) for v in d["max"]),
            margin=float(d.get("margin", 0.1)),
            dtype=str(d.get("dtype", "float32")),
        )


def validate_features(X: object, spec: FeatureSpec | None = None) -> np.ndarray:
    """Return X as a C-contiguous float32 (n, F) array, or raise ValueError saying what is wrong.

    Checks: 2-D, width equal to `spec.width` (when given), every value finite. The message
    names the offending rows (and columns) so a caller can find the broken samples.
    """
    try:
        arr = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"router features must be numeric, got {type(X).__name__}: {exc}") from exc
    if arr.ndim != 2:
        hint = " (one sample? use X.reshape(1, -1))" if arr.ndim == 1 else ""
        raise ValueError(f"router features must be a 2-D array (n, F); got shape {arr.shape}{hint}")
    if spec is not None and arr.shape[1] != spec.width:
        more = ", ..." if spec.width > 4 else ""
        raise ValueError(
            f"router features have width {arr.shape[1]} but the router was trained on "
            f"{spec.width} features ({', '.join(spec.names[:4])}{more})"
        )
    finite = np.isfinite(arr)
    if not finite.all():
        problems = []
        for label, mask in (("NaN", np.isnan(arr)), ("inf", np.isinf(arr))):
            rows = np.flatnonzero(mask.any(axis=1))
            if rows.size:
                cols = np.flatnonzero(mask.any(axis=0))
                names = [spec.names[c] if spec is not None else str(c) for c in cols[:_MAX_LISTED]]
                problems.append(f"{label} in rows {_listed(rows)} (features {', '.join(names)})")
        raise ValueError("router features must be finite: " + "; ".join(problems))
    return np.ascontiguousarray(arr)


def validate_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """Scales are visual tokens per scale: positive ints, strictly ascending."""
    try:
        out = tuple(int(s) for s in scales)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"scales must be a sequence of ints, got {scales!r}") from exc
    if not out:
        raise ValueError("scales must not be empty")
    if any(s != float(v) for s, v in zip(out, scales, strict=True)):
        raise ValueError(f"scales must be integers, got {tuple(scales)}")
    if out[0] < 1 or any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(f"scales must be positive and strictly ascending, got {out}")
    return out


def validate_correct(
    correct: object, n_scales: int | None = None, n: int | None = None
) -> np.ndarray:
    """Correctness matrix as bool (n, S); rejects non-binary values and shape mismatches."""
    arr = np.asarray(correct)
    if arr.ndim != 2:
        raise ValueError(f"correct must be a 2-D (n, S) matrix, got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError("correct must hold only 0/1 or True/False values")
        arr = arr.astype(bool)
    if n_scales is not None and arr.shape[1] != n_scales:
        raise ValueError(f"correct has {arr.shape[1]} columns but there are {n_scales} scales")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"correct has {arr.shape[0]} rows but X has {n}")
    return arr
