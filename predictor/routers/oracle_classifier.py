"""Baseline: predict the oracle scale directly as a multiclass label.

It learns from the oracle index alone, so it cannot tell "easy, small scale suffices" from
"hopeless, wrong everywhere" (both are labelled with the smallest scale by M3's definition),
and it throws away how much worse the other scales are. The per-scale ScaleRouter should
beat it; this class exists to show by how much.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator

from predictor.features import FeatureSpec, validate_correct, validate_features, validate_scales
from predictor.oracle import oracle_scale_index
from predictor.policies import quantile_policy

__all__ = ["OracleScaleClassifier"]


class OracleScaleClassifier(BaseEstimator):
    """Multiclass logistic regression or LightGBM on the oracle scale index.

    `route` picks the smallest scale whose cumulative predicted class probability reaches
    `knob` (0.5: the predicted median oracle scale; higher spends more). Parameters and
    fitted state follow scikit-learn's conventions, as `ScaleRouter`'s do.
    """

    def __init__(
        self,
        estimator: str = "logreg",
        scales: Sequence[int] | None = None,
        knob: float = 0.5,
        C: float = 1.0,
        n_estimators: int = 100,
        learning_rate: float = 0.05,
        num_leaves: int = 15,
        random_state: int = 0,
    ):
        self.estimator = estimator
        self.scales = scales
        self.knob = knob
        self.C = C
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.random_state = random_state

    def fit(
        self,
        X: np.ndarray,
        correct: np.ndarray,
        *,
        feature_names: Sequence[str] | None = None,
    ) -> OracleScaleClassifier:
        if self.scales is None:
            raise ValueError("OracleScaleClassifier needs scales=(...), one per column of correct")
        self.scales_ = validate_scales(self.scales)
        X = validate_features(X)
        correct = validate_correct(correct, n_scales=len(self.scales_), n=X.shape[0])
        self.feature_spec_ = FeatureSpec.from_training(X, feature_names)
        y, _ = oracle_scale_index(correct)
        if self.estimator == "logreg":
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            model = make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=1000))
        elif self.estimator == "lightgbm":
            import lightgbm as lgb

            model = lgb.LGBMClassifier(
                n_estimators=self.n_estimators,
                learning_rate=self.learning_rate,
                num_leaves=self.num_leaves,
                random_state=self.random_state,
                n_jobs=1,
                verbose=-1,
            )
        else:
            raise ValueError(f"estimator must be 'logreg' or 'lightgbm', got {self.estimator!r}")
        classes = np.unique(y)
        if len(classes) == 1:
            self.model_, self.constant_ = None, int(classes[0])
        else:
            self.model_, self.constant_ = model.fit(X, y), None
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, S) probability that each scale is the oracle scale (absent classes get 0)."""
        X = validate_features(X, self.feature_spec_)
        out = np.zeros((len(X), len(self.scales_)))
        if self.model_ is None:
            out[:, self.constant_] = 1.0
        else:
            out[:, self.model_.classes_] = self.model_.predict_proba(X)
        return out

    def route(
        self,
        X: np.ndarray,
        knob: float | None = None,
        policy: str | None = None,
        costs: Mapping[str, object] | None = None,
    ) -> np.ndarray:
        """Chosen scale values (n,); `policy` may only be None or "quantile"."""
        if policy not in (None, "quantile"):
            raise ValueError(f"OracleScaleClassifier routes by 'quantile' only, not {policy!r}")
        idx = quantile_policy(self.predict_proba(X), self.knob if knob is None else knob)
        return np.asarray(self.scales_, dtype=np.int64)[idx]
