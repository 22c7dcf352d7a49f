"""predictor: features -> P(correct at each scale) -> one scale per sample.

Learns from numpy arrays only (no transformers, no m3core): the correctness matrix from
labelling, router features, and per-scale costs. Serves through ONNX Runtime.

Names load on first use (PEP 562), so that the command line's help or a policy name does
not import scikit-learn, SciPy and ONNX first.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS: dict[str, tuple[str, ...]] = {
    "predictor.calibrate": (
        "CALIBRATION_JSON",
        "TuneResult",
        "calibration_table",
        "checked_target",
        "knob_for_target",
        "load_calibration",
        "parse_target",
        "save_calibration",
        "tune",
        "tune_to_accuracy_loss",
        "tune_to_budget",
    ),
    "predictor.curves": (
        "evaluate_choice",
        "evaluate_choices",
        "evaluate_knobs",
        "fixed_points",
        "frontier",
        "gap_closed",
        "group_prior",
        "no_loss_point",
        "sweep",
        "write_curve_report",
    ),
    "predictor.features": (
        "FeatureSpec",
        "validate_features",
    ),
    "predictor.oracle": (
        "budgeted_oracle_curve",
        "chance_corrected",
        "oracle_point",
        "oracle_scale_index",
        "plurality_share",
    ),
    "predictor.policies": (
        "GATE_THRESHOLDS",
        "POLICIES",
        "PROBE_POLICIES",
        "ROUTER_POLICIES",
        "Policy",
        "ProbeScores",
        "StagedRoute",
        "cascade_policy",
        "fixed_policy",
        "get_policy",
        "quantile_policy",
        "random_policy",
        "staged_policy",
        "threshold_policy",
        "utility_policy",
    ),
    "predictor.routers": (
        "OracleScaleClassifier",
        "ProbeRouter",
        "ScaleRouter",
        "load_router",
    ),
    "predictor.selection": (
        "DEFAULT_CANDIDATES",
        "Selection",
        "scale_scores",
        "select_router",
    ),
    "predictor.serving": ("RouterFileError",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> object:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'predictor' has no attribute {name!r}")
    return getattr(import_module(_MODULE_OF[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
