"""LightGBM per scale, exported through onnxmltools and stacked into one ONNX graph."""

from __future__ import annotations

import numpy as np
import onnx

from predictor.routers.base import ProbabilityEstimator, constant_probability
from predictor.serving import OPSET, stack_binary_graphs

__all__ = ["LightGBMEstimator"]


class LightGBMEstimator(ProbabilityEstimator):
    """One gradient-boosted binary classifier per scale.

    `n_jobs=1` by default: routers are small and the project's CI machines have 2 shared cores.
    """

    name = "lightgbm"

    def __init__(
        self,
        n_estimators: int = 100,
        learning_rate: float = 0.05,
        num_leaves: int = 15,
        min_child_samples: int = 20,
        reg_lambda: float = 1.0,
        subsample: float = 1.0,
        colsample_bytree: float = 1.0,
        n_jobs: int = 1,
        random_state: int = 0,
    ):
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.reg_lambda = reg_lambda
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X: np.ndarray, Y: np.ndarray) -> LightGBMEstimator:
        import lightgbm as lgb

        X = np.asarray(X, dtype=np.float32)
        Y = np.asarray(Y, dtype=bool)
        self.models_: list[lgb.Booster | float] = []
        for s in range(Y.shape[1]):
            p = constant_probability(Y[:, s])
            if p is not None:
                self.models_.append(p)
                continue
            clf = lgb.LGBMClassifier(
                n_estimators=self.n_estimators,
                learning_rate=self.learning_rate,
                num_leaves=self.num_leaves,
                min_child_samples=self.min_child_samples,
                reg_lambda=self.reg_lambda,
                subsample=self.subsample,
                subsample_freq=1 if self.subsample < 1 else 0,
                colsample_bytree=self.colsample_bytree,
                n_jobs=self.n_jobs,
                random_state=self.random_state,
                verbose=-1,
            )
            clf.fit(X, Y[:, s].astype(np.int32))
            self.models_.append(clf.booster_)
        self.n_features_in_ = X.shape[1]
        self.n_outputs_ = Y.shape[1]
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        self._check_fitted()
        X = np.asarray(X, dtype=np.float32)
        cols = [
            np.full(len(X), m) if isinstance(m, float) else m.predict(X, num_threads=self.n_jobs)
            for m in self.models_
        ]
        return np.stack(cols, axis=1).astype(np.float64)

    def to_onnx(self) -> onnx.ModelProto:
        import onnxmltools
        from onnxmltools.convert.common.data_types import FloatTensorType

        self._check_fitted()
        F = self.n_features_in_
        parts: list[onnx.ModelProto | float] = [
            m
            if isinstance(m, float)
            else onnxmltools.convert_lightgbm(
                m,
                initial_types=[("X", FloatTensorType([None, F]))],
                zipmap=False,
                target_opset=OPSET,
            )
            for m in self.models_
        ]
        return stack_binary_graphs(parts, F)
