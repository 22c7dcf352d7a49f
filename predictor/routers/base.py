"""Per-scale probability estimators: fit(X, Y) with Y bool (n, S), predict_proba -> (n, S).

Each scale gets its own model of P(correct at scale s | x) (one output head per scale for
the MLP). Probabilities are NOT forced monotone in scale: real labels are not (a sample can
be right at 1 token and wrong at 144; that is why M3's oracle beats its largest scale), and
the threshold policy does not need it since it scans scales in order of cost.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx
from sklearn.base import BaseEstimator
from sklearn.metrics import brier_score_loss, log_loss

__all__ = ["ProbabilityEstimator", "constant_probability", "scale_scores"]


def scale_scores(correct: np.ndarray, P: np.ndarray) -> dict:
    """Per-scale and mean log-loss and Brier score of probabilities P against labels."""
    P = np.clip(np.asarray(P, dtype=np.float64), 1e-7, 1 - 1e-7)
    ll = [log_loss(correct[:, s], P[:, s], labels=[False, True]) for s in range(P.shape[1])]
    br = [brier_score_loss(correct[:, s], P[:, s], pos_label=True) for s in range(P.shape[1])]
    return {
        "log_loss": float(np.mean(ll)),
        "brier": float(np.mean(br)),
        "per_scale_log_loss": [float(v) for v in ll],
        "per_scale_brier": [float(v) for v in br],
    }


def constant_probability(y: np.ndarray) -> float | None:
    """Laplace-smoothed rate when a scale's labels are all equal (no classifier fits), else None."""
    y = np.asarray(y, dtype=bool)
    if y.all() or not y.any():
        return (float(y.sum()) + 1.0) / (len(y) + 2.0)
    return None


class ProbabilityEstimator(BaseEstimator):
    """scikit-learn estimator API plus `to_onnx()`; subclasses set `name`."""

    name: ClassVar[str] = "base"

    def fit(self, X: np.ndarray, Y: np.ndarray) -> ProbabilityEstimator:
        raise NotImplementedError

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def to_onnx(self) -> onnx.ModelProto:
        """ONNX graph with input "X" float32 (n, F) and output "P" float32 (n, S)."""
        raise NotImplementedError

    def _check_fitted(self) -> None:
        from sklearn.exceptions import NotFittedError

        if not hasattr(self, "n_features_in_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit first")
