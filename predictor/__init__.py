"""predictor: features -> P(correct at each scale) -> one scale per sample.

Learns from numpy arrays only (no transformers, no m3core): the correctness matrix from
labelling, router features, and per-scale costs. Serves through ONNX Runtime.
"""

from predictor.calibrate import (
    CALIBRATION_JSON,
    TuneResult,
    calibration_table,
    checked_target,
    knob_for_target,
    load_calibration,
    parse_target,
    save_calibration,
    tune,
    tune_to_accuracy_loss,
    tune_to_budget,
)
from predictor.curves import (
    evaluate_choice,
    evaluate_knobs,
    fixed_points,
    frontier,
    gap_closed,
    group_prior,
    no_loss_point,
    sweep,
    write_curve_report,
)
from predictor.features import FeatureSpec, validate_features
from predictor.oracle import budgeted_oracle_curve, oracle_point, oracle_scale_index
from predictor.policies import (
    POLICIES,
    ROUTER_POLICIES,
    Policy,
    cascade_policy,
    fixed_policy,
    get_policy,
    quantile_policy,
    random_policy,
    threshold_policy,
    utility_policy,
)
from predictor.routers import OracleScaleClassifier, ScaleRouter
from predictor.selection import DEFAULT_CANDIDATES, Selection, scale_scores, select_router
from predictor.serving import RouterFileError

__all__ = [
    "CALIBRATION_JSON",
    "DEFAULT_CANDIDATES",
    "FeatureSpec",
    "OracleScaleClassifier",
    "POLICIES",
    "Policy",
    "ROUTER_POLICIES",
    "RouterFileError",
    "ScaleRouter",
    "Selection",
    "TuneResult",
    "budgeted_oracle_curve",
    "calibration_table",
    "cascade_policy",
    "checked_target",
    "evaluate_choice",
    "evaluate_knobs",
    "fixed_points",
    "fixed_policy",
    "frontier",
    "gap_closed",
    "get_policy",
    "group_prior",
    "knob_for_target",
    "load_calibration",
    "no_loss_point",
    "oracle_point",
    "oracle_scale_index",
    "parse_target",
    "quantile_policy",
    "random_policy",
    "save_calibration",
    "scale_scores",
    "select_router",
    "sweep",
    "threshold_policy",
    "tune",
    "tune_to_accuracy_loss",
    "tune_to_budget",
    "utility_policy",
    "validate_features",
    "write_curve_report",
]
