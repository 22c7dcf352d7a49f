"""ScaleRouter: features -> P(correct at each scale) -> one scale per sample; save/load as ONNX."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from predictor.features import FeatureSpec, validate_correct, validate_features, validate_scales
from predictor.policies import POLICIES, apply_policy, relative_cost
from predictor.routers.base import ProbabilityEstimator, scale_scores
from predictor.routers.lgbm import LightGBMEstimator
from predictor.routers.logreg import LogisticEstimator
from predictor.routers.mlp import MLPEstimator
from predictor.serving import OnnxProbabilityModel, RouterFileError, sha256_file

__all__ = ["ScaleRouter", "ESTIMATORS", "ROUTER_JSON", "MODEL_ONNX"]

ESTIMATORS: dict[str, type[ProbabilityEstimator]] = {
    "lightgbm": LightGBMEstimator,
    "logreg": LogisticEstimator,
    "mlp": MLPEstimator,
}
_ROUTED = tuple(n for n, p in POLICIES.items() if p.needs_router or p.knob_kind == "scale")
ROUTER_JSON, MODEL_ONNX = "router.json", "model.onnx"
_FORMAT, _VERSION = "adaptive-m3/scale-router", 1
_OWN_PARAMS = ("estimator", "scales", "policy", "knob", "fallback_out_of_range", "range_margin")


def _jsonable(v: object) -> object:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _check_policy(policy: str) -> None:
    """A router runs the policies on its own P(correct), and "fixed"."""
    if policy not in _ROUTED:
        raise ValueError(f"unknown router policy {policy!r}; choose one of {_ROUTED}")


class ScaleRouter(BaseEstimator):
    """Learns P(correct at scale s | features) for every scale and routes with a policy.

    A scikit-learn estimator: parameters in `__init__` only, `fit(X, correct)` returns self,
    fitted state in `model_`, `scales_`, `feature_spec_` and `n_features_in_`, so `clone`
    and `cross_val_score` (scored by `score`, the negative mean log-loss) work on it.

    Parameters
    ----------
    estimator: "lightgbm" | "logreg" | "mlp"; its hyper-parameters go in `**estimator_params`.
    scales: the visual tokens of each column of `correct`, ascending (e.g. (1, 9, 36, 144)).
    policy, knob: how `route` picks a scale; threshold, utility or fixed, the knob meaning what
        `predictor.POLICIES[policy].knob` says ("fixed": the scale to always use, what a
        failed guarantee falls back to).
    fallback_out_of_range: when True, `route` sends every row with a feature outside the
        training range (widened by `range_margin` times its width on each side) to the
        largest scale, since the router's probabilities there are extrapolation. Off by
        default: it costs tokens, and tree models extrapolate flat rather than wildly.

    A fitted router predicts natively (LightGBM / scikit-learn / torch); one from `load`
    predicts through onnxruntime. Both give the same probabilities within 1e-5.
    """

    def __init__(
        self,
        estimator: str = "lightgbm",
        *,
        scales: Sequence[int] | None = None,
        policy: str = "threshold",
        knob: float = 0.5,
        fallback_out_of_range: bool = False,
        range_margin: float = 0.1,
        **estimator_params: object,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {list(ESTIMATORS)}")
        _check_policy(policy)
        valid = ESTIMATORS[estimator]._get_param_names()
        unknown = sorted(set(estimator_params) - set(valid))
        if unknown:
            raise ValueError(f"{estimator} does not take {unknown}; its parameters are {valid}")
        self.estimator = estimator
        self.scales = scales
        self.policy = policy
        self.knob = knob
        self.fallback_out_of_range = fallback_out_of_range
        self.range_margin = range_margin
        self.estimator_params = dict(estimator_params)

    # -- scikit-learn parameter API -------------------------------------------------------
    def get_params(self, deep: bool = True) -> dict:
        """Router parameters plus every estimator hyper-parameter (defaults filled in)."""
        est = ESTIMATORS[self.estimator](**self.estimator_params).get_params()
        return {k: getattr(self, k) for k in _OWN_PARAMS} | est

    def set_params(self, **params: object) -> ScaleRouter:
        """Policy and knob apply at once; scales and estimator parameters at the next `fit`."""
        own = {k: v for k, v in params.items() if k in _OWN_PARAMS}
        est = {k: v for k, v in params.items() if k not in _OWN_PARAMS}
        estimator = own.get("estimator", self.estimator)
        if estimator != self.estimator:
            self.estimator_params = {}
        merged = {**self.estimator_params, **est}
        probe = ScaleRouter(
            **{k: own.get(k, getattr(self, k)) for k in _OWN_PARAMS}, **merged
        )  # validates names and values the same way __init__ does
        for k in _OWN_PARAMS:
            setattr(self, k, getattr(probe, k))
        self.estimator_params = probe.estimator_params
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"ScaleRouter({args})"

    # -- fitted state ---------------------------------------------------------------------
    def _check_fitted(self) -> None:
        check_is_fitted(self, msg="this ScaleRouter is not fitted; call fit() or load()")

    def _set_fitted(
        self,
        model: ProbabilityEstimator | OnnxProbabilityModel,
        scales: tuple[int, ...],
        spec: FeatureSpec,
    ) -> None:
        self.model_, self.scales_, self.feature_spec_ = model, scales, spec
        self.n_features_in_ = spec.width

    @property
    def backend(self) -> str:
        """Either "onnx" (a loaded router) or "native" (a fitted one)."""
        self._check_fitted()
        return "onnx" if isinstance(self.model_, OnnxProbabilityModel) else "native"

    @property
    def providers(self) -> list[str] | None:
        """onnxruntime execution providers in use (None when predicting natively)."""
        self._check_fitted()
        return self.model_.providers if isinstance(self.model_, OnnxProbabilityModel) else None

    # -- learning and routing -------------------------------------------------------------
    def fit(
        self,
        X: np.ndarray,
        correct: np.ndarray,
        *,
        feature_names: Sequence[str] | None = None,
    ) -> ScaleRouter:
        """Learn P(correct at s | x) for every scale from the (n, S) correctness matrix,
        whose columns are `scales`."""
        if self.scales is None:
            raise ValueError(
                "ScaleRouter needs scales=(...), the visual tokens of each column of correct"
            )
        scales = validate_scales(self.scales)
        X = validate_features(X)
        correct = validate_correct(correct, n_scales=len(scales), n=X.shape[0])
        if X.shape[0] < 2:
            raise ValueError("a router needs at least 2 training samples")
        spec = FeatureSpec.from_training(X, feature_names, margin=self.range_margin)
        model = ESTIMATORS[self.estimator](**self.estimator_params).fit(X, correct)
        self._set_fitted(model, scales, spec)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, S) float64: P(correct at each scale). Raises ValueError on bad features."""
        self._check_fitted()
        return self.model_.predict_proba(validate_features(X, self.feature_spec_))

    def score(self, X: np.ndarray, correct: np.ndarray) -> float:
        """Negative mean log-loss over scales (higher is better): what `select_router` and
        scikit-learn's `cross_val_score` compare routers by."""
        P = self.predict_proba(X)
        correct = validate_correct(correct, n_scales=len(self.scales_), n=P.shape[0])
        return -scale_scores(correct, P)["log_loss"]

    def out_of_range(self, X: np.ndarray) -> np.ndarray:
        """Bool (n,): rows with a feature outside the (widened) training range."""
        self._check_fitted()
        return self.feature_spec_.out_of_range(validate_features(X, self.feature_spec_))

    def route(
        self,
        X: np.ndarray,
        knob: float | None = None,
        policy: str | None = None,
        costs: Mapping[str, object] | Sequence[float] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Chosen scale VALUES (n,) int64, e.g. [1, 36, 9, ...].

        `costs` matters only for utility: a per-scale cost vector or a costs dict (its
        "tokens" entry); it is divided by the largest scale's cost. Default: the scales.
        A knob that is not a finite number (a router saved before tuning) raises ValueError.
        """
        self._check_fitted()
        scales = self.scales_
        policy = self.policy if policy is None else policy
        knob = self.knob if knob is None else knob
        _check_policy(policy)
        X = validate_features(X, self.feature_spec_)
        P = self.model_.predict_proba(X)
        cost = None
        if policy == "utility":
            raw = costs.get("tokens") if isinstance(costs, Mapping) else costs
            cost = relative_cost(scales if raw is None else raw)
        idx, _ = apply_policy(policy, P, float(knob), scales, cost)
        if self.fallback_out_of_range:
            idx = np.where(self.feature_spec_.out_of_range(X), len(scales) - 1, idx)
        return np.asarray(scales, dtype=np.int64)[idx]

    # -- serving --------------------------------------------------------------------------
    def to_onnx(self):  # -> onnx.ModelProto
        self._check_fitted()
        if isinstance(self.model_, OnnxProbabilityModel):
            import onnx

            return onnx.load_from_string(self.model_.model_bytes)
        return self.model_.to_onnx()

    def save(self, directory: str | Path) -> Path:
        """Write `model.onnx` and `router.json` into `directory`; returns the folder."""
        self._check_fitted()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        onnx_path = out / MODEL_ONNX
        onnx_path.write_bytes(self.to_onnx().SerializeToString())
        knob = float(self.knob)
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "scales": list(self.scales_),
            "estimator": self.estimator,
            "estimator_params": {k: _jsonable(v) for k, v in self.estimator_params.items()},
            "policy": self.policy,
            "knob": knob if math.isfinite(knob) else None,
            "fallback_out_of_range": bool(self.fallback_out_of_range),
            "feature_spec": self.feature_spec_.to_dict(),
            "onnx": {"file": MODEL_ONNX, "sha256": sha256_file(onnx_path)},
        }
        (out / ROUTER_JSON).write_text(json.dumps(meta, indent=1) + "\n")
        return out

    @classmethod
    def load(
        cls,
        directory: str | Path,
        expected_scales: Sequence[int] | None = None,
        providers: Sequence[str] | None = None,
    ) -> ScaleRouter:
        """Load a saved router onto onnxruntime (CUDA first when usable, else CPU).

        Raises FileNotFoundError / RouterFileError (a ValueError) naming the missing or
        malformed file, and ValueError naming both tuples when `expected_scales` (the model's
        scales) differ from the router's.
        """
        folder = Path(directory)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: router folder does not exist")
        meta_path = folder / ROUTER_JSON
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: router.json is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RouterFileError(f"{meta_path}: not valid JSON ({exc})") from exc
        try:
            if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
                raise ValueError(f"'format' is not {_FORMAT!r}")
            if meta.get("version") != _VERSION:
                raise ValueError(f"unsupported version {meta.get('version')!r}")
            scales = validate_scales(meta["scales"])
            spec = FeatureSpec.from_dict(meta["feature_spec"])
            params = dict(meta.get("estimator_params", {}))
            if "hidden" in params:
                params["hidden"] = tuple(params["hidden"])
            knob = meta["knob"]
            router = cls(
                estimator=meta["estimator"],
                scales=scales,
                policy=meta["policy"],
                knob=float("nan") if knob is None else float(knob),
                fallback_out_of_range=bool(meta["fallback_out_of_range"]),
                range_margin=spec.margin,
                **params,
            )
            onnx_name = str(meta["onnx"]["file"])
            checksum = str(meta["onnx"]["sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise RouterFileError(f"{meta_path}: malformed router file: {what}") from exc
        if expected_scales is not None and tuple(expected_scales) != scales:
            raise ValueError(
                f"router at {folder} was trained for scales {scales} but the model runs "
                f"scales {tuple(expected_scales)}; retrain or pick the matching router"
            )
        onnx_path = folder / onnx_name
        if not onnx_path.is_file():
            raise FileNotFoundError(f"{onnx_path}: ONNX model named in router.json is missing")
        if sha256_file(onnx_path) != checksum:
            raise RouterFileError(
                f"{onnx_path}: contents do not match the sha256 in {meta_path} "
                "(the file was changed or belongs to another router)"
            )
        model = OnnxProbabilityModel(onnx_path, spec.width, len(scales), providers)
        router._set_fitted(model, scales, spec)
        return router
