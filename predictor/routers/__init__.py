"""Routers: per-scale probability estimators behind ScaleRouter, the probe policies' ProbeRouter,
and the oracle-scale baseline."""

from predictor.routers.base import ProbabilityEstimator
from predictor.routers.lgbm import LightGBMEstimator
from predictor.routers.logreg import LogisticEstimator
from predictor.routers.mlp import MLPEstimator
from predictor.routers.oracle_classifier import OracleScaleClassifier
from predictor.routers.probe_router import ProbeRouter, load_router
from predictor.routers.scale_router import ESTIMATORS, ScaleRouter

__all__ = [
    "ESTIMATORS",
    "LightGBMEstimator",
    "LogisticEstimator",
    "MLPEstimator",
    "OracleScaleClassifier",
    "ProbabilityEstimator",
    "ProbeRouter",
    "ScaleRouter",
    "load_router",
]
